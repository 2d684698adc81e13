"""Instruction rows -> chat rendering -> token ids with a completion-only loss mask -> padded batches.

A row holds ``instruction``, ``input`` (may be empty) and ``output``. It is rendered as a chat
(optional system message, one user turn, one assistant turn) with the tokenizer's own chat template,
and only the assistant's answer, up to and including the EOS token that closes it, is trained:
every other position carries label ``-100``. The same :class:`Rendering` is saved with the adapter
so that generation later builds prompts exactly as training did.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_lora import demo
from lit_lora.config import DataConfig
from lit_lora.errors import UserError

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
RENDERING_FILE = "rendering.json"


@dataclass
class Rendering:
    """How rows become chat prompts; saved as ``rendering.json`` beside the adapter."""

    system_prompt: str | None = None
    format: str = "alpaca"

    def messages(self, row: dict, with_answer: bool) -> list[dict[str, str]]:
        user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": user})
        if with_answer:
            msgs.append({"role": "assistant", "content": row["output"]})
        return msgs

    def save(self, folder: Path) -> None:
        (folder / RENDERING_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> Rendering:
        return cls(**json.loads((folder / RENDERING_FILE).read_text()))


def _ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, rendering: Rendering, row: dict) -> list[int]:
    """Token ids of the prompt a model answers (ends with the assistant header)."""
    return _ids(tokenizer, rendering.messages(row, with_answer=False), add_generation_prompt=True)


def encode(tokenizer, rendering: Rendering, row: dict, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` for one row, or None if truncation leaves no trained token.

    ``labels`` equals ``input_ids`` on the answer and its closing EOS, ``-100`` elsewhere. Tokens the
    template adds after the EOS (SmolLM2's newline) are cut: the model must learn to stop at EOS.
    """
    prompt = prompt_ids(tokenizer, rendering, row)
    full = _ids(tokenizer, rendering.messages(row, with_answer=True), add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise UserError("the chat template renders the prompt differently with and without the answer")
    eos = tokenizer.eos_token_id
    end = len(full)
    while end > len(prompt) and full[end - 1] != eos:
        end -= 1
    if end == len(prompt):  # template without EOS after the answer: append one
        full, end = [*full, eos], len(full) + 1
    full = full[: min(end, max_seq_len)]
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    labels = labels[: len(full)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": full, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line or a row without the needed fields is a :class:`UserError`."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("output"), str)
        ):
            raise UserError(f"{path}:{number}: a row needs string fields 'instruction' and 'output'")
        if not isinstance(row.get("input", ""), str):
            raise UserError(f"{path}:{number}: field 'input' must be a string")
        rows.append(row)
    return rows


class InstructionDataModule(L.LightningDataModule):
    """Train / val / test splits of instruction rows, tokenized once in :meth:`setup`.

    Writes the demo splits into ``data_dir`` when ``cfg.source == "demo"``. After setup,
    ``self.rows[split]`` holds the raw rows and ``self.stats`` the counts of dropped and truncated rows.
    """

    def __init__(self, cfg: DataConfig, tokenizer, data_dir: Path, rendering: Rendering | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir)
        self.rendering = rendering or Rendering(system_prompt=cfg.system_prompt)
        self.rows: dict[str, list[dict]] = {}
        self.examples: dict[str, list[dict[str, list[int]]]] = {}
        self.stats: dict[str, int] = {}

    def _paths(self) -> dict[str, Path]:
        if self.cfg.source == "demo":
            return demo.write_splits(
                self.data_dir, self.cfg.train_size, self.cfg.val_size, self.cfg.test_size, self.cfg.seed
            )
        folder = Path(self.cfg.source).expanduser()
        paths = {split: folder / f"{split}.jsonl" for split in SPLITS}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise UserError(f"data.source={self.cfg.source}: missing {', '.join(missing)}")
        return paths

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        dropped = truncated = 0
        for split, path in self._paths().items():
            self.rows[split] = read_rows(path)
            encoded = []
            for row in self.rows[split]:
                example = encode(self.tokenizer, self.rendering, row, self.cfg.max_seq_len)
                if example is None:
                    dropped += 1
                    continue
                truncated += example["labels"][-1] != self.tokenizer.eos_token_id
                encoded.append(example)
            self.examples[split] = encoded
        if not self.examples["train"]:
            raise UserError(
                f"no training example has a trained token left at data.max_seq_len={self.cfg.max_seq_len}"
            )
        self.stats = {"dropped": dropped, "truncated": int(truncated)}
        self.stats.update({f"{split}_examples": len(ex) for split, ex in self.examples.items()})

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.examples[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.cfg.num_workers,
            collate_fn=functools.partial(collate, pad_id=self.tokenizer.pad_token_id),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.cfg.eval_batch_size, shuffle=False)

    def trained_tokens_per_example(self) -> float:
        ex = self.examples["train"]
        return sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in ex) / len(ex)

    def tokens_per_example(self) -> float:
        ex = self.examples["train"]
        return sum(len(e["input_ids"]) for e in ex) / len(ex)
