"""The data module: sources -> validated rows -> splits -> token ids with loss masks -> batches.

Finding sources lives in :mod:`lit_lora.data.sources`, reading them in :mod:`lit_lora.data.readers`,
row validation in :mod:`lit_lora.data.rows`, rendering and masking in
:mod:`lit_lora.data.rendering`, padding / packing / sampling in :mod:`lit_lora.data.batching`; this module
plans the splits, enforces the length rules and caches the result.

Length rules: an example over ``data.max_seq_len`` tokens is truncated (counted); one left with no
trained token is dropped (counted, its location reported), never trained on; a row over
``too_long_factor * max_seq_len`` tokens is a bad row (probably the wrong column or a whole document).

Splits: ``train`` from ``source``; ``val`` from ``val_source``, from a split folder's ``val.*``, or a
``val_fraction`` of the training rows drawn with ``data.seed``; ``test`` likewise (``test_fraction``).

Cache: tokenized splits are saved under ``<lit-lora cache>/data/<key>`` where the key hashes the
source files' bytes, the tokenizer's vocabulary and special tokens, the rendering and every option
that changes the result, so a second run with the same inputs starts training without tokenizing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from jinja2 import TemplateError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lit_lora.config.schema import DataConfig
from lit_lora.data import demo
from lit_lora.data.batching import (
    EpochSampler,
    ResumableLoader,
    RolloutBatchSampler,
    StepBatchSampler,
    collate,
    collate_pairs,
    collate_prompts,
    pack,
    padding_fraction,
)
from lit_lora.data.readers import read_file, read_hub, read_saved
from lit_lora.data.rendering import (
    IGNORE_INDEX,
    Rendering,
    TemplateMismatch,
    count_trained,
    encode_answer,
    encode_conversation,
    encode_text,
    prompt_ids,
)
from lit_lora.data.rows import HUB_PREFIX, BadRows, Row, describe, to_row
from lit_lora.data.sources import expand_files, is_saved_dataset, source_list, split_files
from lit_lora.errors import UserError
from lit_lora.models.embedded import cache_root
from lit_lora.staging import staged_folder

SPLITS = ("train", "val", "test")
# The built-in tasks (lit_lora/data/demo.py) and the kind of rows each writes.
DEMO_SOURCES = {"demo": "sft", "demo_preference": "preference", "demo_prompt": "prompt"}
CACHE_VERSION = 2  # bump when encoding or validation changes, so old caches are not reused
__all__ = ["IGNORE_INDEX", "DataModule", "Rendering", "collate"]


# ----------------------------------------------------------------------------------------- planning
Origin = tuple[str, str]  # ("file", path) | ("saved", folder) | ("hub", "hf:<id>")


def plan_sources(cfg: DataConfig, data_dir: Path) -> dict[str, list[Origin]]:
    """Where each split's rows come from; splits not listed are drawn from train by fraction."""
    if isinstance(cfg.source, str) and cfg.source in DEMO_SOURCES:
        kind = DEMO_SOURCES[cfg.source]
        paths = demo.write_splits(data_dir, cfg.train_size, cfg.val_size, cfg.test_size, cfg.seed, kind)
        return {split: [("file", str(path))] for split, path in paths.items()}
    plan: dict[str, list[Origin]] = {}
    for split, spec in (("train", cfg.source), ("val", cfg.val_source), ("test", cfg.test_source)):
        for item in source_list(spec):
            folder = Path(item).expanduser()
            if item.startswith(HUB_PREFIX):
                plan.setdefault(split, []).append(("hub", item))
            elif folder.is_dir() and is_saved_dataset(folder):
                plan.setdefault(split, []).append(("saved", str(folder)))
            elif folder.is_dir():
                found = split_files(folder)
                if "train" not in found and split == "train":
                    raise UserError(
                        f"data.source={item}: the folder holds no train.jsonl/.json/.csv/.parquet"
                    )
                for sub, paths in found.items():
                    target = split if split != "train" else sub
                    plan.setdefault(target, []).extend(("file", str(p)) for p in paths)
            else:
                plan.setdefault(split, []).extend(("file", str(p)) for p in expand_files(item))
    return plan


def _fingerprint_file(path: Path, digest) -> None:
    digest.update(str(path.resolve()).encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def cache_key(
    plan: dict[str, list[Origin]],
    tokenizer,
    rendering: Rendering,
    cfg: DataConfig,
    max_prompt_len: int | None = None,
) -> str:
    """Hash of everything a tokenized split depends on (see the module docstring)."""
    digest = hashlib.sha256(f"lit-lora-data-v{CACHE_VERSION}".encode())
    for split in sorted(plan):
        for kind, where in plan[split]:
            digest.update(f"{split}:{kind}:{where}".encode())
            if kind == "file":
                _fingerprint_file(Path(where), digest)
            elif kind == "saved":
                for path in sorted(Path(where).rglob("*")):
                    if path.is_file():
                        _fingerprint_file(path, digest)
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([type(tokenizer).__name__, vocab, tokenizer.eos_token_id]).encode())
    digest.update(json.dumps(asdict(rendering), sort_keys=True).encode())
    options = {
        k: getattr(cfg, k)
        for k in ("max_seq_len", "too_long_factor", "on_bad_row", "val_fraction", "test_fraction", "seed")
    }
    options.update(hub=(cfg.hub_split, cfg.hub_subset), format=cfg.format, max_prompt_len=max_prompt_len)
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:24]


# ------------------------------------------------------------------------------------------ reading
def read_rows(
    plan: dict[str, list[Origin]], cfg: DataConfig, bad: BadRows
) -> tuple[dict[str, list[Row]], int]:
    """Validated rows of every split, and how many rows were read in all, good or bad.

    Bad rows raise (one :class:`UserError` line) or are counted in ``bad``, per ``cfg.on_bad_row``;
    nothing about one row raises anything else (see :mod:`lit_lora.data.rows`)."""
    fields = asdict(cfg.fields)
    raw: dict[str, list[tuple[str, dict]]] = {}
    for split, origins in plan.items():
        for kind, where in origins:
            if kind == "file":
                raw.setdefault(split, []).extend(read_file(Path(where), bad))
            elif kind == "hub":
                raw.setdefault(split, []).extend(read_hub(where, cfg.hub_split, cfg.hub_subset, bad))
            else:
                for sub, items in read_saved(Path(where), bad).items():
                    raw.setdefault(sub if split == "train" else split, []).extend(items)
    n_read = sum(len(items) for items in raw.values()) + sum(bad.counts.values())  # + unparseable lines
    rows: dict[str, list[Row]] = {}
    for split, items in raw.items():
        converted = (to_row(obj, loc, cfg.format, fields, bad) for loc, obj in items)
        rows[split] = [row for row in converted if row is not None]
    return _draw_splits(rows, cfg), n_read


def _draw_splits(rows: dict[str, list[Row]], cfg: DataConfig) -> dict[str, list[Row]]:
    """Fill missing val / test splits with seeded fractions of the training rows."""
    train = rows.get("train", [])
    wanted = {
        s: f for s, f in (("val", cfg.val_fraction), ("test", cfg.test_fraction)) if s not in rows and f > 0
    }
    if wanted:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        taken: set[int] = set()
        start = 0
        for split, fraction in wanted.items():
            n = max(1, round(fraction * len(train))) if len(train) > 1 else 0
            picked = order[start : start + n]
            rows[split] = [train[i] for i in sorted(picked)]
            taken.update(picked)
            start += n
        rows["train"] = [row for i, row in enumerate(train) if i not in taken]
    for split in SPLITS:
        rows.setdefault(split, [])
    return rows


# ----------------------------------------------------------------------------------------- encoding
def encode_rows(
    rows: list[Row],
    tokenizer,
    rendering: Rendering,
    cfg: DataConfig,
    bad: BadRows,
    desc: str,
    max_prompt_len: int | None = None,
) -> tuple[list[dict[str, list[int]]], list[Row], dict[str, int]]:
    """Examples and the rows they came from, with ``truncated`` / ``dropped`` counts.

    Dropped: no trained token left after truncation. Reported to ``bad`` as ``too_long``: rows over
    ``too_long_factor * max_seq_len`` tokens. A row that cannot be rendered or tokenized is a bad row
    too (``template_mismatch``, ``template_error``, and ``encode_error`` for any other failure), so one
    row never ends the run with a traceback; rows are validated first (:mod:`lit_lora.data.rows`), which
    names the causes it knows, such as text the tokenizer cannot encode.

    A prompt row (``data.format=prompt``) becomes ``{"input_ids": <the rendered prompt, assistant header
    included>, "index": <its position among the kept rows>}``; one over ``max_prompt_len`` tokens
    (``data.max_seq_len - objective.max_completion_length``) is the bad row ``prompt_too_long``: a prompt
    is never truncated (its end is the question).
    """
    examples, kept = [], []
    counts = {"truncated": 0, "dropped_no_trained_token": 0}
    limit = cfg.max_seq_len
    for row in tqdm(rows, desc=desc, unit="row", disable=len(rows) < 500, mininterval=1.0):
        try:
            if row.columns is not None:  # a prompt (GRPO): the model writes the answer
                ids = prompt_ids(tokenizer, rendering, row.messages)
                if max_prompt_len is not None and len(ids) > max_prompt_len:
                    bad.add(
                        row.loc,
                        "prompt_too_long",
                        f"the prompt has {len(ids)} tokens, over data.max_seq_len - "
                        f"objective.max_completion_length = {max_prompt_len}",
                    )
                    continue
                examples.append({"input_ids": ids, "index": len(kept)})
                kept.append(row)
                continue
            if row.rejected is not None:  # a preference pair: both sides, answers labelled
                sides = [encode_answer(tokenizer, rendering, m) for m in (row.messages, row.rejected)]
            elif row.text is not None:
                sides = [encode_text(tokenizer, row.text)]
            else:
                sides = [encode_conversation(tokenizer, rendering, row.messages)]
        except TemplateMismatch as err:
            bad.add(row.loc, "template_mismatch", str(err))
            continue
        except TemplateError as err:  # the template's own raise_exception(), or a row it cannot render
            bad.add(row.loc, "template_error", f"the chat template refuses this row: {describe(err)}")
            continue
        except Exception as err:  # safety net: whatever the tokenizer or template raise, it costs one row
            bad.add(row.loc, "encode_error", f"cannot be tokenized: {describe(err)}")
            continue
        longest = max(len(ids) for ids, _ in sides)
        if cfg.too_long_factor is not None and longest > cfg.too_long_factor * limit:
            bad.add(
                row.loc,
                "too_long",
                f"{longest} tokens, over {cfg.too_long_factor:g} x data.max_seq_len={limit}",
            )
            continue
        if longest > limit:
            # A pair keeps its prompt (the shared start) and cuts each answer to fit.
            sides = [(ids[:limit], labels[:limit]) for ids, labels in sides]
            counts["truncated"] += 1
        if any(count_trained(labels) == 0 for _, labels in sides):
            if row.rejected is not None:  # a pair without an answer token compares nothing: a bad row
                bad.add(
                    row.loc,
                    "no_answer_token",
                    f"an answer has no token left within data.max_seq_len={limit} after the prompt",
                )
                continue
            counts["dropped_no_trained_token"] += 1
            bad.first.setdefault(
                "dropped_no_trained_token", f"{row.loc}: no answer token left within max_seq_len"
            )
            continue
        (ids, labels), *rejected = sides
        example = {"input_ids": ids, "labels": labels}
        if rejected:
            example["rejected_input_ids"], example["rejected_labels"] = rejected[0]
        examples.append(example)
        kept.append(row)
    return examples, kept, counts


# -------------------------------------------------------------------------------------------- cache
def _save_cache(folder: Path, examples: dict, rows: dict, stats: dict) -> None:
    import datasets

    folder.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache root is an error, as before
    # The folder is complete or absent, and private (0o700). An OSError while writing or publishing it
    # is not fatal: another run wrote the folder first, or the disk is full.
    with contextlib.suppress(OSError), staged_folder(folder, mode=0o700) as tmp:
        for split, items in examples.items():
            columns = {key: [e[key] for e in items] for key in (items[0] if items else ())}
            if items:  # datasets cannot read back an empty saved dataset
                datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / split))
            with (tmp / f"{split}.rows.jsonl").open("w", encoding="utf-8") as f:
                for row in rows[split]:
                    # default=str: a column value JSON cannot hold (a date from parquet) is kept as text.
                    f.write(json.dumps(row.to_json(), ensure_ascii=False, default=str) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))


def _load_cache(folder: Path) -> tuple[dict, dict, dict] | None:
    import datasets

    if not (folder / "stats.json").is_file():
        return None
    examples, rows = {}, {}
    for split in SPLITS:
        saved = folder / split
        examples[split] = datasets.load_from_disk(str(saved)).to_list() if saved.is_dir() else []
        lines = (folder / f"{split}.rows.jsonl").read_text(encoding="utf-8").splitlines()
        rows[split] = [Row(**json.loads(line)) for line in lines]
    return examples, rows, json.loads((folder / "stats.json").read_text())


# ------------------------------------------------------------------------------------------- module
class DataModule(L.LightningDataModule):
    """Train / val / test splits, prepared once in :meth:`setup`.

    After setup: ``rows[split]`` (the :class:`~lit_lora.data.rows.Row` objects kept), ``examples[split]``
    (token ids and labels), ``train_set`` (the examples, packed when ``data.packing``) and ``stats``
    (counts of rows, examples, bad rows by reason, truncated and dropped rows, padding fraction).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        data_dir: Path,
        rendering: Rendering | None = None,
        *,
        max_prompt_len: int | None = None,
        num_generations: int = 1,
        num_iterations: int = 1,
    ):
        """``max_prompt_len``, ``num_generations`` and ``num_iterations`` apply to prompt rows (GRPO): the
        longest prompt kept, completions per prompt (``data.batch_size`` counts completions, so a
        micro-batch holds ``batch_size / num_generations`` prompts) and optimizer steps per round."""
        super().__init__()
        self.max_prompt_len = max_prompt_len
        self.num_generations = num_generations
        self.num_iterations = num_iterations
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir)
        self.rendering = rendering or Rendering.resolve(
            tokenizer,
            cfg.template,
            system_prompt=cfg.system_prompt,
            train_on_inputs=cfg.train_on_inputs,
            format=cfg.format,
            fields=asdict(cfg.fields),
        )
        self.rows: dict[str, list[Row]] = {}
        self.examples: dict[str, list[dict[str, list[int]]]] = {}
        self.train_set: list[dict[str, list[int]]] = []
        self.stats: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        plan = plan_sources(self.cfg, self.data_dir)
        folder = None
        if self.cfg.cache:  # the key hashes the whole vocabulary: worth it only when a cache is used
            root = Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else cache_root() / "data"
            folder = root / cache_key(plan, self.tokenizer, self.rendering, self.cfg, self.max_prompt_len)
        cached = (
            _load_cache(folder)
            if folder is not None and not any(k == "hub" for o in plan.values() for k, _ in o)
            else None
        )
        if cached:
            self.examples, self.rows, self.stats = cached
            self.stats["cache"] = "hit"
        else:
            self._prepare(plan)
            self.stats["cache"] = "miss"
            if folder is not None:
                _save_cache(folder, self.examples, self.rows, self.stats)
        self._finish()

    @classmethod
    def from_examples(
        cls, cfg: DataConfig, tokenizer, examples: dict[str, list[dict[str, list[int]]]]
    ) -> DataModule:
        """A data module over examples tokenized elsewhere (``{"train": [...], "val": [...]}``, each
        ``{"input_ids", "labels"}`` as :func:`encode_rows` makes them): reads no source, keeps the
        batching of ``cfg`` (batch size, length grouping, packing, seed). Used to mix several
        datasets, e.g. the benchmark's mix of the four application presets."""
        module = cls(cfg, tokenizer, Path("."))
        module.examples = {split: list(examples.get(split, [])) for split in SPLITS}
        module.stats = {"examples": {split: len(v) for split, v in module.examples.items()}}
        module._finish()
        return module

    def _finish(self) -> None:
        """Checks the training split and forms the training set (packed or not) and its statistics."""
        if not self.examples["train"]:
            raise UserError(
                f"no training example left (data.max_seq_len={self.cfg.max_seq_len}; see the counts: {self.stats})"
            )
        self.train_set = (
            pack(self.examples["train"], self.cfg.max_seq_len) if self.cfg.packing else self.examples["train"]
        )
        self.stats["packed_rows"] = len(self.train_set) if self.cfg.packing else None
        self.stats["padding_fraction"] = round(
            padding_fraction(self._ordered_train(), self.cfg.batch_size), 4
        )

    def _prepare(self, plan: dict[str, list[Origin]]) -> None:
        bad = BadRows(self.cfg.on_bad_row)
        rows, n_read = read_rows(plan, self.cfg, bad)
        counts = {"truncated": 0, "dropped_no_trained_token": 0}
        for split in SPLITS:
            examples, kept, c = encode_rows(
                rows[split],
                self.tokenizer,
                self.rendering,
                self.cfg,
                bad,
                desc=f"tokenizing {split}",
                max_prompt_len=self.max_prompt_len,
            )
            self.examples[split], self.rows[split] = examples, kept
            for key in counts:
                counts[key] += c[key]
        self.stats = {
            "rows_read": n_read,
            "examples": {split: len(self.examples[split]) for split in SPLITS},
            "bad_rows": dict(sorted(bad.counts.items())),
            **counts,
            "first_of_each": bad.first,
            "notes": bad.notes,
        }

    def _ordered_train(self) -> list[dict[str, list[int]]]:
        """Training examples in a representative batching order (for the padding fraction)."""
        lengths = [len(e["input_ids"]) for e in self.train_set]
        sampler = EpochSampler(lengths, self.cfg.batch_size, self.cfg.seed, self.cfg.group_by_length)
        return [self.train_set[i] for i in sampler.order(0)]

    @property
    def pairs(self) -> bool:
        """True for preference data: an example is a pair (``rejected_input_ids`` / ``rejected_labels``)."""
        return self.cfg.format == "preference"

    @property
    def prompts(self) -> bool:
        """True for prompt rows (GRPO): an example is a prompt the model answers during training."""
        return self.cfg.format == "prompt"

    def _collate(self):
        if self.prompts:
            return collate_prompts
        return functools.partial(collate_pairs if self.pairs else collate, pad_id=self.tokenizer.pad_token_id)

    def _batches_consumed(self) -> int:
        """Batches of the current epoch the training loop has finished (the resume position)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def step_sampler(self) -> StepBatchSampler:
        """This rank's micro-batches by optimizer step (rank, world size and accumulation from the trainer).

        The sampler shards by rank itself (the trainer runs with ``use_distributed_sampler=False``), so
        that every rank knows the trained-token count of each whole optimizer step.
        """
        lengths = [len(e["input_ids"]) for e in self.train_set]
        trainer = self.trainer
        accum = trainer.accumulate_grad_batches if trainer is not None else 1
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.prompts:
            micro = self.cfg.batch_size // self.num_generations  # batch_size counts completions
            order = EpochSampler(lengths, micro, self.cfg.seed, self.cfg.group_by_length)
            return RolloutBatchSampler(order, micro, accum, rank, world, self.num_iterations)
        order = EpochSampler(lengths, self.cfg.batch_size, self.cfg.seed, self.cfg.group_by_length)
        # A preference loss is a mean over pairs, so a step is weighted by its pairs, not its tokens.
        trained = [1 if self.pairs else count_trained(e["labels"]) for e in self.train_set]
        return StepBatchSampler(order, trained, self.cfg.batch_size, accum, rank, world)

    def train_dataloader(self) -> ResumableLoader:
        sampler = self.step_sampler()
        if len(sampler) == 0:
            raise UserError(
                f"{len(self.train_set)} training items are fewer than one optimizer step of "
                f"{sampler.step_size} (data.batch_size x trainer.accumulate_grad_batches x devices)"
            )
        return ResumableLoader(
            self.train_set,
            sampler,
            self._batches_consumed,
            num_workers=self.cfg.num_workers,
            collate_fn=self._collate(),
        )

    def val_dataloader(self) -> DataLoader:
        if self.prompts:  # GRPO validates by decoding the val prompts (LitLoRA.validation_step)
            return DataLoader(
                [{**e, "step_tokens": (0, 0, ())} for e in self.examples["val"]],
                batch_size=self.cfg.eval_batch_size,
                shuffle=False,
                collate_fn=collate_prompts,
                generator=torch.Generator(),
            )
        # Validation is never packed: its loss stays comparable between packed and unpacked runs.
        return DataLoader(
            self.examples["val"],
            batch_size=self.cfg.eval_batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            collate_fn=self._collate(),
            generator=torch.Generator(),  # iterating must not draw from the global RNG (resume exactness)
        )

    def tokens_per_example(self) -> float:
        """Mean tokens of one batch item: an example, a packed row when ``data.packing``, both sides of a pair."""
        ex = self.train_set
        return sum(len(e["input_ids"]) + len(e.get("rejected_input_ids", ())) for e in ex) / len(ex)

    def trained_tokens_per_example(self) -> float:
        """Mean trained tokens of one batch item (as :meth:`tokens_per_example`)."""
        ex = self.train_set
        return sum(
            count_trained(e.get("labels", [])) + count_trained(e.get("rejected_labels", [])) for e in ex
        ) / len(ex)
