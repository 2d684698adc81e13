"""Measure models: ``lit-lora evaluate adapters=[<folder>,...] [data=...] [split=test]``.

For the base model (``base=true``) and each adapter, on one split of any dataset the data module reads:

- perplexity over the split's trained tokens (token-weighted, fp32);
- task metrics of greedy answers against the reference (the last assistant turn), through torchmetrics:
  exact match (JSON-aware, as in training's held-out score), SQuAD-style token F1 and ROUGE-L;
- on preference data (``data.format=preference``), where the chosen answer is the reference of the two
  above: the preference accuracy, the share of pairs whose chosen answer the model finds more likely
  than the rejected one (training's held-out ``preference_tuned``), and the mean log-prob margin;
- on prompt rows (``data.format=prompt``, GRPO): no perplexity (they hold no answer); the mean reward of
  the greedy answers under ``rewards=`` (default: the first adapter's run's rewards) and per function,
  and the task metrics against an ``answer`` column where the rows have one (the RL demo's).

Each adapter is rendered with its own saved rendering, so its prompts are exactly those of its
training; the base model uses the first adapter's (or the data config's). The table is printed and
written as JSON (``output``, default ``<work_dir>/evaluation.json``). Adapters from any PEFT tool load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchmetrics.functional.text import rouge_score, squad
from torchmetrics.text import Perplexity

from lit_lora.config.apps import EvaluateConfig, typed
from lit_lora.config.compose import compose
from lit_lora.data.batching import MODEL_KEYS, collate
from lit_lora.data.module import DataModule
from lit_lora.data.rendering import IGNORE_INDEX, encode_conversation
from lit_lora.errors import UserError
from lit_lora.inference.decoding import eval_mode
from lit_lora.inference.scoring import exact_match, generate_answers, preference_accuracy
from lit_lora.models.adapters import attach_adapter, check_adapter_folder, rendering_for
from lit_lora.models.builder import build_model
from lit_lora.paths import confined
from lit_lora.rewards.held_out import reward_scores


@torch.no_grad()
def perplexity(model, tokenizer, rendering, rows, max_seq_len: int, batch_size: int) -> float:
    """Token-weighted perplexity of the answers (trained tokens) of ``rows`` under ``rendering``: the
    same torchmetrics metric as training's ``val/ppl`` (:class:`lit_lora.training.module.LitLoRA`)."""
    with eval_mode(model):
        metric = Perplexity(ignore_index=IGNORE_INDEX)
        examples = []
        for row in rows:
            ids, labels = encode_conversation(tokenizer, rendering, row.messages)
            examples.append({"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]})
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(
                **{k: v for k, v in batch.items() if k in MODEL_KEYS and k != "labels"}, use_cache=False
            ).logits
            metric.update(logits[:, :-1].float(), batch["labels"][:, 1:])
    return float(metric.compute())


def task_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    hits = exact_match(answers, references)
    preds = [{"prediction_text": a.strip(), "id": str(i)} for i, a in enumerate(answers)]
    targets = [
        {"answers": {"answer_start": [0], "text": [r]}, "id": str(i)} for i, r in enumerate(references)
    ]
    f1 = float(squad(preds, targets)["f1"])
    rouge = float(
        rouge_score([a.strip() for a in answers], references, rouge_keys="rougeL")["rougeL_fmeasure"]
    )
    return {
        "exact_match": round(100.0 * sum(hits) / max(len(hits), 1), 2),
        "f1": round(f1, 2),
        "rouge_l": round(100.0 * rouge, 2),
    }


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate the base and the adapters; returns (and writes) ``{"split", "n", "models": [...]}``."""
    if not cfg.adapters and not cfg.base:
        raise UserError("nothing to evaluate: give adapters=[...] or base=true")
    folders = [check_adapter_folder(a) for a in cfg.adapters]
    built = build_model(cfg)
    base, tokenizer, source = built.model, built.tokenizer, built.source
    work = confined("work_dir", cfg.work_dir, cfg.output_root)
    work.mkdir(parents=True, exist_ok=True)
    first_rendering = rendering_for(folders[0], tokenizer) if folders else None
    data = DataModule(cfg.data, tokenizer, work / "data", rendering=first_rendering)
    data.setup()
    rows = data.rows[cfg.split]
    if not rows:
        raise UserError(
            f"split {cfg.split!r} of this data has no rows (set data.test_fraction or data.test_source)"
        )
    scored = [r for r in rows if r.messages and r.reference is not None]
    prompts = data.prompts  # GRPO's prompt rows: no answer to measure perplexity on; rewards score them
    rewards = _rewards(cfg, folders) if prompts else []
    batch = cfg.data.eval_batch_size
    results = []
    for name, folder in [("base", None)] * cfg.base + [(str(f), f) for f in folders]:
        model = attach_adapter(base, folder) if folder is not None else base
        rendering = rendering_for(folder, tokenizer) if folder is not None else data.rendering
        entry = {"model": name}
        if not prompts:
            entry["perplexity"] = round(
                perplexity(model, tokenizer, rendering, rows, cfg.data.max_seq_len, batch), 4
            )
        if cfg.generate and scored:
            answers = generate_answers(
                model,
                tokenizer,
                rendering,
                [r.prompt_turns for r in scored],
                cfg.data.score_max_new_tokens,
                batch,
                desc=f"generating ({Path(name).parent.name or name})",
            )
            entry.update(task_metrics(answers, [r.reference for r in scored]))
            entry["examples"] = [
                {"answer": a, "reference": r.reference} for a, r in zip(answers[:3], scored[:3], strict=False)
            ]
        if cfg.generate and rewards:
            score = reward_scores(
                model,
                tokenizer,
                [e["input_ids"] for e in data.examples[cfg.split]],
                rows,
                rewards,
                cfg.data.score_max_new_tokens,
                batch,
                desc=f"rewards ({Path(name).parent.name or name})",
            )
            entry["reward"] = round(score["total"], 4)
            entry["rewards"] = {
                k: None if v is None else round(v, 4) for k, v in score["per_function"].items()
            }
        if data.pairs:
            pairs = preference_accuracy(
                model, tokenizer.pad_token_id, data.examples[cfg.split], batch, use_adapter=True
            )
            entry["preference_accuracy"] = round(pairs["accuracy"], 2)
            entry["logp_margin"] = round(pairs["mean_logp_margin"], 4)
        results.append(entry)
        if folder is not None:
            base = model.unload()  # take the adapter's layers out before the next one goes in
    report = {"base_model": source, "split": cfg.split, "n": len(rows), "models": results}
    out = confined("output", cfg.output, cfg.output_root) if cfg.output else work / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _print_table(report, out)
    return report


def _rewards(cfg: EvaluateConfig, folders: list[Path]) -> list:
    """The reward functions that score prompt rows: ``rewards=`` or, when not given, those of the first
    adapter's run (``<run>/config.yaml``); none (reward metrics left out) when neither has any."""
    from omegaconf import OmegaConf

    from lit_lora.rewards.loading import load_rewards

    if cfg.rewards:
        return load_rewards(cfg.rewards)
    for folder in folders[:1]:
        saved = folder.parent / "config.yaml"
        if saved.is_file():
            return load_rewards(OmegaConf.load(saved).get("rewards"))
    return []


def _print_table(report: dict, out: Path) -> None:
    keys = ["perplexity", "exact_match", "f1", "rouge_l"]
    if any("reward" in m for m in report["models"]):
        keys += ["reward"]
    if any("preference_accuracy" in m for m in report["models"]):
        keys += ["preference_accuracy", "logp_margin"]
    width = max(len(m["model"]) for m in report["models"])
    print(f"lit-lora: {report['split']} split, {report['n']} rows, base {report['base_model']}")
    columns = [max(11, len(k)) for k in keys]
    print("  ".join(["model".ljust(width), *(k.rjust(c) for k, c in zip(keys, columns, strict=True))]))
    for m in report["models"]:
        cells = (str(m.get(k, "-")).rjust(c) for k, c in zip(keys, columns, strict=True))
        print("  ".join([m["model"].ljust(width), *cells]))
    print(f"lit-lora: written {out}", flush=True)


def run(overrides: Sequence[str] = ()) -> dict:
    """``lit-lora evaluate <overrides>`` as a function (:mod:`lit_lora.config.compose`); returns the report
    also written as JSON. Raises :class:`~lit_lora.errors.UserError` for user mistakes."""
    return evaluate(typed(compose("evaluate", overrides), EvaluateConfig))


def task(cfg: DictConfig) -> None:
    """``lit-lora evaluate``'s job on the composed config (:mod:`lit_lora.cli`)."""
    evaluate(typed(cfg, EvaluateConfig))
