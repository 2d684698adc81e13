"""Reward functions (GRPO): the built-ins on realistic completions, loading the config's ``rewards``, the
checks of what a reward function returns, and TRL's reward functions running unchanged.

Everything here is plain Python on hand-written completions: no model, no tokenizer.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lit_lora.errors import UserError
from lit_lora.rewards.calling import completion_text, score_completions
from lit_lora.rewards.exact_match import exact_match
from lit_lora.rewards.fields_matched import fields_matched
from lit_lora.rewards.format_regex import regex_format
from lit_lora.rewards.json_valid import json_valid
from lit_lora.rewards.length_penalty import length_penalty
from lit_lora.rewards.loading import RewardFunction, load_rewards

HERE = "tests.rewards.test_rewards"
BUILTIN = "lit_lora.rewards"

# The demo task's answer (lit_lora.data.demo) and completions a policy could sample for it.
ANSWER = '{"name": "Chen Romero", "age": 27, "job": "librarian", "city": "Kyoto"}'
PROMPT = "Extract the person record from the sentence as JSON.\nAt 27, Chen Romero runs a small business in Kyoto as a librarian."
RIGHT = '{"city": "Kyoto", "job": "librarian", "age": 27, "name": "Chen Romero"}'  # key order differs
RIGHT_SPACED = '  {"name":"Chen Romero","age":27,"job":"librarian","city":"Kyoto"}\nDone.'
WRONG_AGE = '{"name": "Chen Romero", "age": 72, "job": "librarian", "city": "Kyoto"}'
EXTRA_KEY = '{"name": "Chen Romero", "age": 27, "job": "librarian", "city": "Kyoto", "country": "Japan"}'
TWO_FIELDS = '{"name": "Chen Romero", "city": "Kyoto"}'
PROSE = "The person is Chen Romero, 27, a librarian in Kyoto."
BROKEN = '{"name": "Chen Romero", "age": 27,'


def chat(text: str) -> list[dict]:
    """TRL's conversational completion: a list of one assistant message."""
    return [{"role": "assistant", "content": text}]


def call(fn, completions, **columns):
    """Call a built-in as the trainer does (every argument by keyword)."""
    n = len(completions)
    return fn(prompts=[PROMPT] * n, completions=completions, completion_ids=[[1, 2, 3]] * n, **columns)


# --------------------------------------------------------------------- reward functions in TRL's style
# Written as TRL's documentation writes them, to be loaded by _target_ and run unchanged.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def reward_conversational_len(completions, **kwargs):
    return [-abs(20 - len(completion[0]["content"])) for completion in completions]


def reward_answer_in_text(completions, ground_truth, **kwargs):
    return [1.0 if gt in c else 0.0 for c, gt in zip(completions, ground_truth, strict=True)]


def reward_with_bonus(completions, bonus=0.0, **kwargs):
    return [len(c) + bonus for c in completions]


# Targets for the checks: each breaks the contract in one way.
NOT_CALLABLE = 42


def no_kwargs(prompts, completions, completion_ids):
    return [0.0] * len(completions)


def positional_only(completions, /, **kwargs):
    return [0.0] * len(completions)


def raises(completions, **kwargs):
    raise ValueError("no solution in the row\nsecond line of the message")


def returns_too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def returns_a_number(completions, **kwargs):
    return 1.0


def returns_nan(completions, **kwargs):
    return [0.0, float("nan"), 1.0][: len(completions)]


def returns_inf(completions, **kwargs):
    return [0.0, 1.0, -math.inf][: len(completions)]


def returns_huge(completions, **kwargs):
    return [1e39] * len(completions)  # finite in Python, inf in float32


def returns_text(completions, **kwargs):
    return [0.0, "1.0", 1.0][: len(completions)]


def returns_numpy(completions, **kwargs):
    return np.array([len(c) for c in completions], dtype=np.float64)


def returns_tensors(completions, **kwargs):
    return [torch.tensor(1.5), np.bool_(True), None][: len(completions)]


# ---------------------------------------------------------------------------------------- the built-ins
@pytest.mark.parametrize("form", [str, chat], ids=["text", "conversational"])
def test_exact_match_compares_json_answers_as_objects(form):
    completions = [form(c) for c in (RIGHT, RIGHT_SPACED, WRONG_AGE, PROSE, BROKEN)]
    assert call(exact_match, completions, answer=[ANSWER] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_text_answers_none_and_parsed_answers():
    completions = ["  Kyoto\n", "Osaka", "anything", RIGHT, "27"]
    answers = [
        "Kyoto",
        "Kyoto",
        None,
        {"name": "Chen Romero", "age": 27, "job": "librarian", "city": "Kyoto"},
        27,
    ]
    assert call(exact_match, completions, answer=answers) == [1.0, 0.0, None, 1.0, 1.0]


@pytest.mark.parametrize("form", [str, chat], ids=["text", "conversational"])
def test_json_valid_wants_an_object_at_the_start(form):
    completions = [form(c) for c in (RIGHT, RIGHT_SPACED, PROSE, BROKEN, "[1, 2]", '"Kyoto"', "")]
    assert call(json_valid, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("form", [str, chat], ids=["text", "conversational"])
def test_fields_matched_gives_partial_credit(form):
    completions = [form(c) for c in (RIGHT, WRONG_AGE, EXTRA_KEY, TWO_FIELDS, PROSE, "{}")]
    rewards = call(fields_matched, completions, answer=[ANSWER] * 6)
    # all 4 | 3 of 4 | 4 matched of 5 keys | 2 of 4 | no object | an object with none of the keys
    assert rewards == [1.0, 0.75, 0.8, 0.5, 0.0, 0.0]


def test_fields_matched_none_where_the_answer_is_no_object():
    answers = [None, "Kyoto", "[1, 2]", {"city": "Kyoto"}, "{}"]
    completions = [RIGHT, RIGHT, RIGHT, chat(TWO_FIELDS), "{}"]
    # a parsed dict answer is used as it is; two empty objects are equal
    assert call(fields_matched, completions, answer=answers) == [None, None, None, 0.5, 1.0]


def test_fields_matched_compares_nested_values_whole():
    answer = '{"person": {"name": "Ann", "age": 3}, "ok": true}'
    completions = [
        '{"person": {"name": "Ann", "age": 3}, "ok": true}',
        '{"person": {"name": "Ann"}, "ok": true}',
    ]
    assert call(fields_matched, completions, answer=[answer] * 2) == [1.0, 0.5]


@pytest.mark.parametrize("form", [str, chat], ids=["text", "conversational"])
def test_regex_format_matches_the_whole_stripped_text(form):
    completions = [form(c) for c in (RIGHT, "\n" + RIGHT + "\n", '{"a": 1}\n{"b": 2}', RIGHT_SPACED, PROSE)]
    # DOTALL: a match may span lines; fullmatch: trailing prose fails
    assert call(regex_format, completions, pattern=r"\{.*\}") == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_length_penalty_is_linear_up_to_max_tokens():
    ids = [[], [7] * 16, [7] * 64, [7] * 200]
    rewards = length_penalty(prompts=[PROMPT] * 4, completions=["x"] * 4, completion_ids=ids, max_tokens=64)
    assert rewards == [0.0, -0.25, -1.0, -1.0]
    assert length_penalty(prompts=[PROMPT], completions=["x"], completion_ids=[[1] * 32]) == [
        -0.5
    ]  # default 64
    with pytest.raises(ValueError, match="max_tokens"):
        length_penalty(prompts=[PROMPT], completions=["x"], completion_ids=[[1]], max_tokens=0)


def test_completion_text_of_both_forms():
    assert completion_text(" {} ") == " {} "
    assert completion_text(chat("hi")) == "hi"
    # the last message is the completion's own (a tool exchange may come before it)
    assert (
        completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "b"
    )
    assert (
        completion_text(
            [{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
        )
        == "xy"
    )
    assert completion_text([]) == ""
    with pytest.raises(TypeError):
        completion_text(42)


# ----------------------------------------------------------------------------------------------- loading
def test_load_from_a_mapping_binds_kwargs_and_weights():
    spec = {
        "fmt": {"_target_": f"{BUILTIN}.format_regex.regex_format", "pattern": r"\{.*\}", "weight": 0.5},
        "correct": {"_target_": f"{BUILTIN}.exact_match.exact_match"},
        "dropped": None,  # rewards.dropped=null on the command line leaves it out
    }
    fmt, correct = load_rewards(spec)
    assert (fmt.name, fmt.weight, fmt.bound, fmt.columns) == ("fmt", 0.5, ("pattern",), ())
    assert (correct.name, correct.weight, correct.bound, correct.columns) == ("correct", 1.0, (), ("answer",))
    assert fmt.fn(prompts=[PROMPT], completions=[RIGHT], completion_ids=[[1]]) == [1.0]


def test_load_from_a_list_names_by_target_and_dedupes():
    spec = [
        {"_target_": f"{BUILTIN}.json_valid.json_valid"},
        {"_target_": f"{BUILTIN}.length_penalty.length_penalty", "max_tokens": 8, "weight": -2},
        {"_target_": f"{BUILTIN}.json_valid.json_valid", "weight": 0.1},
        {"_target_": f"{BUILTIN}.json_valid.json_valid", "name": "json_valid"},
        {"_target_": f"{BUILTIN}.json_valid.json_valid", "name": "strict"},
    ]
    functions = load_rewards(spec)
    assert [f.name for f in functions] == [
        "json_valid",
        "length_penalty",
        "json_valid_2",
        "json_valid_3",
        "strict",
    ]
    assert [f.weight for f in functions] == [1.0, -2.0, 0.1, 1.0, 1.0]
    assert functions[1].fn(prompts=["p"], completions=["c"], completion_ids=[[1] * 4]) == [-0.5]


def test_load_from_omegaconf_resolves_interpolations():
    cfg = OmegaConf.create(
        {
            "max_len": 16,
            "rewards": {
                "short": {"_target_": f"{BUILTIN}.length_penalty.length_penalty", "max_tokens": "${max_len}"}
            },
            "as_list": [{"_target_": f"{HERE}.reward_len", "weight": 0.25}],
        }
    )
    [short] = load_rewards(cfg.rewards)
    assert short.fn(prompts=["p"], completions=["c"], completion_ids=[[1] * 4]) == [-0.25]
    [length] = load_rewards(cfg.as_list)
    assert (length.name, length.weight) == ("reward_len", 0.25)


@pytest.mark.parametrize("spec", [None, {}, [], OmegaConf.create({}), OmegaConf.create([])])
def test_no_rewards(spec):
    assert load_rewards(spec) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"fmt": {"pattern": "x"}}, r"^rewards\.fmt\._target_ is missing"),
        (
            {"fmt": {"_target_": "no_such_pkg.mod.fn"}},
            r"^rewards\.fmt\._target_='no_such_pkg\.mod\.fn' cannot be imported: ModuleNotFoundError: No module named 'no_such_pkg'",
        ),
        (
            [{"_target_": f"{HERE}.no_such_function"}],
            r"^rewards\[0\]\._target_='tests\.rewards\.test_rewards\.no_such_function' cannot be imported: AttributeError",
        ),
        (
            {"fmt": {"_target_": "reward_len"}},
            r"^rewards\.fmt\._target_='reward_len' must be a dotted import path",
        ),
        (
            {"fmt": {"_target_": f"{HERE}.NOT_CALLABLE"}},
            r"^rewards\.fmt\._target_=.* is not callable \(it is a int\)",
        ),
        (
            [{"_target_": f"{BUILTIN}.json_valid.json_valid"}, {"_target_": f"{HERE}.no_kwargs"}],
            r"^rewards\[1\]\._target_=.*no_kwargs' takes no \*\*kwargs.*f\(prompts, completions, completion_ids, \*\*columns\)",
        ),
        (
            {"len": {"_target_": f"{HERE}.positional_only"}},
            r"^rewards\.len\._target_=.* has the positional-only parameter 'completions'.*\*\*columns",
        ),
        (
            {"len": {"_target_": f"{HERE}.no_kwargs", "bonus": 1}},
            r"^rewards\.len\.bonus: tests\.rewards\.test_rewards\.no_kwargs has no parameter 'bonus'",
        ),
        (
            {"len": {"_target_": f"{HERE}.reward_len", "completions": ["x"]}},
            r"^rewards\.len\.completions cannot be set in the config",
        ),
        (
            {"len": {"_target_": f"{HERE}.reward_len", "weight": "high"}},
            r"^rewards\.len\.weight='high' must be a finite number",
        ),
        (
            {"len": {"_target_": f"{HERE}.reward_len", "weight": float("nan")}},
            r"^rewards\.len\.weight=nan must be a finite",
        ),
        (
            [{"_target_": f"{HERE}.reward_len", "weight": math.inf}],
            r"^rewards\[0\]\.weight=inf must be a finite",
        ),
        (
            {"len": {"_target_": f"{HERE}.reward_len", "weight": True}},
            r"^rewards\.len\.weight=True must be a finite",
        ),
        (
            {"len": {"_target_": f"{HERE}.reward_len", "name": ""}},
            r"^rewards\.len\.name must be a non-empty string",
        ),
        ([f"{HERE}.reward_len"], r"^rewards\[0\] must be a mapping with a _target_"),
        ("reward_len", r"^rewards must be a list or a mapping"),
    ],
    ids=[
        "missing-target",
        "no-module",
        "no-attribute",
        "not-dotted",
        "not-callable",
        "no-kwargs",
        "positional-only",
        "unknown-bound-kwarg",
        "bound-call-argument",
        "weight-text",
        "weight-nan",
        "weight-inf",
        "weight-bool",
        "empty-name",
        "entry-not-mapping",
        "spec-not-container",
    ],
)
def test_load_errors_name_the_key(spec, message):
    with pytest.raises(UserError, match=message) as caught:
        load_rewards(spec)
    assert "\n" not in str(caught.value)


def test_an_unresolvable_interpolation_names_the_key():
    cfg = OmegaConf.create(
        {
            "rewards": {
                "short": {"_target_": f"{BUILTIN}.length_penalty.length_penalty", "max_tokens": "${nope}"}
            }
        }
    )
    with pytest.raises(
        UserError, match=r"^rewards: InterpolationKeyError: Interpolation key 'nope' not found"
    ):
        load_rewards(cfg.rewards)


def test_load_errors_name_a_nested_key():
    with pytest.raises(UserError, match=r"^objective\.rewards\.x\._target_ is missing"):
        load_rewards({"x": {"weight": 1}}, key="objective.rewards")


# ------------------------------------------------------------------------------------------------ calling
LOCS = ["train.jsonl:1", "train.jsonl:1", "train.jsonl:2", "train.jsonl:2"]


def _score(spec, completions, **columns):
    n = len(completions)
    return score_completions(
        load_rewards(spec),
        prompts=[PROMPT] * n,
        completions=completions,
        completion_ids=[[5] * (8 * (i + 1)) for i in range(n)],
        columns=columns,
        locs=LOCS[:n],
    )


def test_score_completions_one_column_per_function_nan_for_none():
    spec = {
        "correct": {"_target_": f"{BUILTIN}.exact_match.exact_match"},
        "fields": {"_target_": f"{BUILTIN}.fields_matched.fields_matched", "weight": 2.0},
        "valid": {"_target_": f"{BUILTIN}.json_valid.json_valid"},
        "short": {"_target_": f"{BUILTIN}.length_penalty.length_penalty", "max_tokens": 32},
    }
    completions = [chat(RIGHT), chat(WRONG_AGE), chat(PROSE), chat("Kyoto")]
    scores = _score(spec, completions, answer=[ANSWER, ANSWER, None, None], city=["Kyoto"] * 4)
    assert scores.dtype == torch.float32 and scores.shape == (4, 4)
    expected = torch.tensor(
        [
            [1.0, 1.0, 1.0, -0.25],
            [0.0, 0.75, 1.0, -0.5],
            [math.nan, math.nan, 0.0, -0.75],
            [math.nan, math.nan, 0.0, -1.0],
        ]
    )
    torch.testing.assert_close(scores, expected, equal_nan=True)


def test_score_completions_with_no_functions_or_no_completions():
    assert _score({}, ["a", "b"]).shape == (2, 0)
    functions = load_rewards([{"_target_": f"{HERE}.reward_len"}])
    assert score_completions(functions, [], [], [], {}, []).shape == (0, 1)


def test_functions_written_for_trl_work_unchanged():
    """TRL's documented examples, loaded by _target_ and called with an extra column they ignore."""
    spec = [
        {"_target_": f"{HERE}.reward_len"},
        {"_target_": f"{HERE}.reward_answer_in_text"},
        {"_target_": f"{HERE}.reward_with_bonus", "bonus": 0.5},
    ]
    completions = ["x" * 20, "Kyoto, of course", "nope"]
    scores = _score(spec, completions, ground_truth=["Kyoto"] * 3, answer=[ANSWER] * 3)
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0, 20.5], [-4.0, 1.0, 16.5], [-16.0, 0.0, 4.5]]))

    conversational = _score(
        {"len": {"_target_": f"{HERE}.reward_conversational_len"}}, [chat("x" * 18), chat("")]
    )
    torch.testing.assert_close(conversational, torch.tensor([[-2.0], [-20.0]]))


def test_trl_own_reward_function_works_unchanged():
    pytest.importorskip("trl.rewards")
    completions = [chat("<think>\nIt says 27.\n</think>\n" + RIGHT), chat(RIGHT)]
    scores = _score(
        {"think": {"_target_": "trl.rewards.think_format_reward"}}, completions, answer=[ANSWER] * 2
    )
    torch.testing.assert_close(scores, torch.tensor([[1.0], [0.0]]))


def test_numpy_arrays_tensors_and_bools_are_rewards():
    scores = _score(
        [{"_target_": f"{HERE}.returns_numpy"}, {"_target_": f"{HERE}.returns_tensors"}], ["ab", "abc", "a"]
    )
    torch.testing.assert_close(
        scores, torch.tensor([[2.0, 1.5], [3.0, 1.0], [1.0, math.nan]]), equal_nan=True
    )


def test_a_missing_column_says_where_to_set_it():
    with pytest.raises(
        UserError,
        match=r"^rewards\.correct needs 'answer': set rewards\.correct\.answer in the config or give the rows a column 'answer' \(the rows train\.jsonl:1, train\.jsonl:2 have the columns: city\)",
    ):
        _score(
            {"correct": {"_target_": f"{BUILTIN}.exact_match.exact_match"}}, [RIGHT] * 4, city=["Kyoto"] * 4
        )
    # a pattern forgotten in the config reads the same way
    with pytest.raises(
        UserError, match=r"^rewards\.fmt needs 'pattern': set rewards\.fmt\.pattern in the config"
    ):
        _score({"fmt": {"_target_": f"{BUILTIN}.format_regex.regex_format"}}, [RIGHT])


def test_a_column_may_not_shadow_a_bound_argument():
    spec = {"fmt": {"_target_": f"{BUILTIN}.format_regex.regex_format", "pattern": "x"}}
    with pytest.raises(
        UserError,
        match=r"^rewards\.fmt\.pattern is set in the config and is also a column of the rows train\.jsonl:1",
    ):
        _score(spec, ["x"], pattern=["y"])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "raises",
            r"^rewards\.raises raised ValueError: no solution in the row on the batch of rows train\.jsonl:1, train\.jsonl:2$",
        ),
        ("returns_too_few", r"^rewards\.returns_too_few returned 2 rewards for 3 completions$"),
        ("returns_a_number", r"^rewards\.returns_a_number returned a float, not a list of 3 rewards"),
        (
            "returns_nan",
            r"^rewards\.returns_nan returned nan for completion 1 \(row train\.jsonl:1\); a reward must be finite",
        ),
        ("returns_inf", r"^rewards\.returns_inf returned -inf for completion 2 \(row train\.jsonl:2\)"),
        ("returns_huge", r"^rewards\.returns_huge returned 1e\+39 for completion 0 \(row train\.jsonl:1\)"),
        (
            "returns_text",
            r"^rewards\.returns_text returned '1\.0' \(str\) for completion 1 \(row train\.jsonl:1\); a reward is a number",
        ),
    ],
)
def test_calling_errors_name_the_function_and_the_row(target, message):
    with pytest.raises(UserError, match=message) as caught:
        _score([{"_target_": f"{HERE}.{target}"}], ["a", "b", "c"])
    assert "\n" not in str(caught.value)


def test_an_invalid_pattern_is_reported_as_the_functions_error():
    with pytest.raises(
        UserError, match=r"^rewards\.fmt raised error: .*on the batch of rows train\.jsonl:1$"
    ):
        _score({"fmt": {"_target_": f"{BUILTIN}.format_regex.regex_format", "pattern": "(unclosed"}}, ["x"])


def test_a_bad_bound_argument_is_reported_at_the_first_call():
    spec = {"short": {"_target_": f"{BUILTIN}.length_penalty.length_penalty", "max_tokens": 0}}
    with pytest.raises(
        UserError, match=r"^rewards\.short raised ValueError: max_tokens must be a positive integer"
    ):
        _score(spec, ["x"])


def test_loading_the_builtins_imports_no_torch():
    """load_rewards runs at config time, before any model: it imports the targets, which must stay cheap."""
    code = (
        "import sys\n"
        "from lit_lora.rewards.loading import load_rewards\n"
        "modules = {'exact_match': 'exact_match', 'json_valid': 'json_valid', 'fields_matched': 'fields_matched',"
        " 'format_regex': 'regex_format', 'length_penalty': 'length_penalty'}\n"
        "spec = [{'_target_': f'lit_lora.rewards.{m}.{f}'} for m, f in modules.items()]\n"
        "assert len(load_rewards(spec)) == 5\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_long_batch_names_its_first_rows():
    functions = [RewardFunction("raises", raises, 1.0)]
    locs = [f"train.jsonl:{i // 2 + 1}" for i in range(16)]  # 8 prompts, 2 completions each
    with pytest.raises(
        UserError,
        match=r"on the batch of rows train\.jsonl:1, train\.jsonl:2, train\.jsonl:3 \.\.\. \(8 rows\)$",
    ):
        score_completions(functions, ["p"] * 16, ["c"] * 16, [[1]] * 16, {}, locs)


def test_inputs_of_different_lengths_are_the_callers_bug():
    with pytest.raises(ValueError, match="answer has 1 entries for 2 completions"):
        score_completions(
            load_rewards([{"_target_": f"{HERE}.reward_len"}]),
            ["p"] * 2,
            ["a", "b"],
            [[1]] * 2,
            {"answer": ["x"]},
            ["l"] * 2,
        )
