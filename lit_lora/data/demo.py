"""The built-in demo task: turn a sentence about a person into a JSON record with a fixed schema.

Example row::

    instruction: "Extract the person record from the sentence as JSON."
    input:       "Tomas Berg, a 41-year-old pharmacist, lives in Porto."
    output:      '{"name": "Tomas Berg", "age": 41, "job": "pharmacist", "city": "Porto"}'

The instruction does not spell out the schema (key names, key order, age as a number), so an
instruct model that has never seen the rows cannot match it; a LoRA adapter learns it from a few
hundred examples. Scoring parses the generated answer as JSON and counts a row as correct only if
the object equals the expected one, which makes the metric exact and immune to spacing.

Generation is deterministic for a given seed. Test rows use first names that never occur in
training rows, so the held-out score measures copying from the sentence, not memorised names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person record from the sentence as JSON."

_TRAIN_FIRST = [
    "Maria",
    "Tomas",
    "Aiko",
    "Liam",
    "Priya",
    "Omar",
    "Sofia",
    "Lukas",
    "Chen",
    "Amara",
    "Diego",
    "Elena",
    "Jonas",
    "Fatima",
    "Noah",
    "Ingrid",
    "Ravi",
    "Yuki",
    "Pablo",
    "Nadia",
    "Erik",
    "Lena",
    "Samuel",
    "Mei",
    "Hugo",
    "Zara",
    "Felix",
    "Ana",
    "Marco",
    "Leila",
    "Oscar",
    "Hana",
    "Ivan",
    "Clara",
    "Kofi",
    "Rosa",
]
_TEST_FIRST = [
    "Beatriz",
    "Anders",
    "Keiko",
    "Mateo",
    "Sunita",
    "Malik",
    "Greta",
    "Tariq",
    "Olga",
    "Emeka",
    "Lucia",
    "Henrik",
]
_LAST = [
    "Lopez",
    "Berg",
    "Tanaka",
    "Murphy",
    "Shah",
    "Haddad",
    "Rossi",
    "Weber",
    "Wang",
    "Okafor",
    "Silva",
    "Novak",
    "Lindqvist",
    "Rahman",
    "Keller",
    "Hansen",
    "Patel",
    "Sato",
    "Romero",
    "Petrova",
    "Larsen",
    "Dubois",
    "Cohen",
    "Zhou",
    "Moreau",
    "Ali",
    "Fischer",
    "Costa",
    "Bianchi",
    "Nasser",
]
_CITIES = [
    "Lisbon",
    "Porto",
    "Oslo",
    "Kyoto",
    "Dublin",
    "Mumbai",
    "Cairo",
    "Rome",
    "Vienna",
    "Shanghai",
    "Lagos",
    "Lima",
    "Prague",
    "Stockholm",
    "Dhaka",
    "Zurich",
    "Copenhagen",
    "Osaka",
    "Madrid",
    "Bruges",
    "Bergen",
    "Lyon",
    "Haifa",
    "Nairobi",
    "Hamburg",
    "Seville",
    "Krakow",
    "Quito",
    "Accra",
    "Turin",
]
_JOBS = [
    "nurse",
    "pharmacist",
    "teacher",
    "carpenter",
    "architect",
    "baker",
    "pilot",
    "chemist",
    "librarian",
    "plumber",
    "journalist",
    "dentist",
    "electrician",
    "gardener",
    "translator",
    "mechanic",
    "photographer",
    "accountant",
    "firefighter",
    "chef",
    "veterinarian",
    "tailor",
    "surveyor",
    "economist",
]

# Each template mentions the four fields in its own order and wording.
_TEMPLATES = (
    "{name}, a {age}-year-old {job}, lives in {city}.",
    "{name} is {age} years old and works as a {job} in {city}.",
    "In {city}, {name} ({age}) earns a living as a {job}.",
    "Meet {name}: {job}, {age}, based in {city}.",
    "The {job} {name} turned {age} last month and still lives in {city}.",
    "{name} moved to {city} at {age} to work as a {job}.",
    "Our new {job} is {name}, aged {age}, who commutes from {city}.",
    "At {age}, {name} runs a small business in {city} as a {job}.",
    "{city} is home to {name}, a {job} who is {age}.",
    "Age {age}, occupation {job}: {name} from {city}.",
)


def _article_fix(sentence: str) -> str:
    # "a architect" -> "an architect": keeps the sentences natural without more templates.
    for vowel in "aeiou":
        sentence = sentence.replace(f" a {vowel}", f" an {vowel}")
    return sentence


def make_rows(n: int, seed: int, held_out_names: bool) -> list[dict[str, str]]:
    """``n`` rows with fields ``instruction``, ``input``, ``output`` (a JSON string)."""
    rng = random.Random(seed)
    first_names = _TEST_FIRST if held_out_names else _TRAIN_FIRST
    rows = []
    for _ in range(n):
        record = {
            "name": f"{rng.choice(first_names)} {rng.choice(_LAST)}",
            "age": rng.randint(19, 88),
            "job": rng.choice(_JOBS),
            "city": rng.choice(_CITIES),
        }
        sentence = _article_fix(rng.choice(_TEMPLATES).format(**record))
        rows.append({"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(record)})
    return rows


# Wrong answers of the preference demo, each breaking the schema in one way. Measured on 40 held-out rows
# each, SmolLM2-135M-Instruct gives the chosen record the higher log-likelihood against a record with a
# field left out in 0 % of pairs (shorter is likelier), against the age as a string in 75 %, and against
# other key names in 100 %: with half left-out fields, the base prefers the chosen answer in ~44 %.
# (Prose, swapped values, and the nested "type"/"data" object it writes by itself all measured 100 %: it
# already prefers the record to those, so they teach nothing.)
_KEY_SYNONYMS = {"name": "full_name", "age": "years", "job": "occupation", "city": "location"}


def _rejected(record: dict, rng: random.Random) -> str:
    """A wrong answer for ``record`` (see the comment above)."""
    kind = rng.randrange(4)
    if kind < 2:
        dropped = rng.choice(["age", "job", "city"])
        return json.dumps({k: v for k, v in record.items() if k != dropped})
    if kind == 2:
        return json.dumps({**record, "age": str(record["age"])})
    return json.dumps({_KEY_SYNONYMS[k]: v for k, v in record.items()})


def make_pairs(n: int, seed: int, held_out_names: bool) -> list[dict[str, str]]:
    """``n`` preference rows (``prompt``, ``chosen``, ``rejected``) of the demo task: the chosen answer is
    the row's JSON record, the rejected one a wrong answer (:func:`_rejected`). The prompt is the
    instruction and the sentence, as the SFT demo renders them."""
    rng = random.Random(seed + 7919)  # its own stream: the rows themselves equal make_rows'
    pairs = []
    for row in make_rows(n, seed, held_out_names):
        record = json.loads(row["output"])
        pairs.append(
            {
                "prompt": f"{row['instruction']}\n\n{row['input']}",
                "chosen": row["output"],
                "rejected": _rejected(record, rng),
            }
        )
    return pairs


# The RL demo's prompt names the keys, so that the base can sometimes answer right (GRPO learns only from
# groups whose rewards differ); what it still has to learn is the exact form: the key names and order, the
# age as a number, one line of JSON and nothing after it.
PROMPT_INSTRUCTION = (
    'Extract the person record from the sentence as one line of JSON with the keys "name", "age" '
    '(a number), "job" and "city", and nothing else.'
)


def make_prompts(n: int, seed: int, held_out_names: bool) -> list[dict[str, str]]:
    """``n`` prompt rows of the demo task for GRPO (``data.format=prompt``): ``prompt`` (the instruction,
    which names the keys, and the sentence) and ``answer`` (the expected JSON record, read by the
    rewards). The sentences are :func:`make_rows`'."""
    return [
        {"prompt": f"{PROMPT_INSTRUCTION}\n\n{row['input']}", "answer": row["output"]}
        for row in make_rows(n, seed, held_out_names)
    ]


def write_splits(
    folder: Path, train_size: int, val_size: int, test_size: int, seed: int, kind: str = "sft"
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` into ``folder``; return their paths.

    The three splits use different derived seeds; ``test`` also uses first names unseen in training.
    ``kind``: ``sft`` (the SFT demo's rows), ``preference`` (:func:`make_pairs`) or ``prompt``
    (:func:`make_prompts`, the RL demo).
    """
    folder.mkdir(parents=True, exist_ok=True)
    make = {"sft": make_rows, "preference": make_pairs, "prompt": make_prompts}[kind]
    splits = {
        "train": make(train_size, seed, held_out_names=False),
        "val": make(val_size, seed + 1, held_out_names=False),
        "test": make(test_size, seed + 2, held_out_names=True),
    }
    paths = {}
    for split, rows in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[split] = path
    return paths
