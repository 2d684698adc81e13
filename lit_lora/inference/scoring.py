"""Answers of a model for conversations (greedy) and their exact match with the reference: the held-out
score of ``lit_lora.training.run`` and the task metrics of ``lit_lora.apps.evaluate``.

Generation uses the same :class:`~lit_lora.data.rendering.Rendering` as training and stops at EOS; the
decoding itself is :func:`lit_lora.inference.decoding.generate_tokens`'s. The reference of a row is its
last assistant turn; the prompt is everything before it. Exact match parses JSON answers (the demo task)
and otherwise compares stripped text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from lit_lora.data.rendering import Rendering, prompt_ids
from lit_lora.data.rows import Row
from lit_lora.inference.decoding import adapter_enabled, eval_mode, generate_tokens
from lit_lora.progress import progress


def generate_answers(
    model,
    tokenizer,
    rendering: Rendering,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[str]:
    """Greedy (deterministic) answers, one string per conversation (which ends before the answer), the
    model as it is (adapter on or off: the caller's). Conversations are decoded ``batch_size`` at a
    time (left-padded, so that every row continues from its own last token). The model's train/eval
    flags are restored afterwards, also on an error."""
    prompts = [prompt_ids(tokenizer, rendering, c) for c in conversations]
    pad_eos = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    new = greedy_answer_tokens(model, prompts, max_new_tokens, batch_size, *pad_eos, desc=desc)
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def greedy_answer_tokens(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int | None,
    eos_id: int | None,
    desc: str,
) -> list[list[int]]:
    """Greedy answers as token ids (EOS included) to tokenized prompts, ``batch_size`` at a time, with a
    progress line per batch (:func:`lit_lora.inference.decoding.generate_tokens` decodes each batch)."""
    answers: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, len(starts), desc):
        answers += generate_tokens(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            eos_id=eos_id,
        )
    return answers


def exact_match_score(
    model,
    tokenizer,
    rendering: Rendering,
    rows: list[Row],
    max_new_tokens: int,
    batch_size: int,
    use_adapter: bool,
) -> dict:
    """Exact match (in %) of the answers to ``rows`` (conversations, each with a reference answer:
    :attr:`Row.reference` not None) with the adapter on or off.

    Returns ``{"exact_match": float, "n": int, "examples": [...], "misses": [...]}`` where examples are the
    first three (answer, reference) pairs and misses up to ten wrong ones.
    """
    with adapter_enabled(model, use_adapter):
        answers = generate_answers(
            model,
            tokenizer,
            rendering,
            [row.prompt_turns for row in rows],
            max_new_tokens,
            batch_size,
            desc="scoring fine-tuned" if use_adapter else "scoring base",
        )
    references = [row.reference for row in rows]
    hits = exact_match(answers, references)
    return {
        "exact_match": 100.0 * sum(hits) / max(len(hits), 1),
        "n": len(hits),
        "examples": [
            {"answer": a, "reference": r} for a, r in zip(answers[:3], references[:3], strict=False)
        ],
        "misses": [
            {"loc": row.loc, "answer": a, "reference": r}
            for a, r, row, hit in zip(answers, references, rows, hits, strict=True)
            if not hit
        ][:10],
    }


@torch.no_grad()
def preference_accuracy(model, pad_id: int, pairs: list[dict], batch_size: int, use_adapter: bool) -> dict:
    """Share (in %) of preference ``pairs`` (examples of :func:`lit_lora.data.module.encode_rows`) whose chosen
    answer the model, adapter on or off, gives a higher log-likelihood than the rejected one.

    Unlike the reward accuracy of DPO (which compares with a reference, so that it is 0 before any
    training), this says which answer the model itself prefers: base and tuned are comparable. The
    model's train/eval flags and adapter are restored afterwards, also on an error. Returns ``{"accuracy": float, "n": int, "mean_logp_margin": float}``."""
    from lit_lora.data.batching import collate_pairs
    from lit_lora.speedups.chunked_loss import sequence_logps, supports_chunked_loss

    device = next(model.parameters()).device
    margins: list[torch.Tensor] = []
    starts = range(0, len(pairs), batch_size)
    chunked = supports_chunked_loss(model)
    with eval_mode(model), adapter_enabled(model, use_adapter):
        desc = "preference tuned" if use_adapter else "preference base"
        for start in progress(starts, len(starts), desc):
            batch = collate_pairs(pairs[start : start + batch_size], pad_id)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            logps, _ = sequence_logps(model, inputs, batch["labels"].to(device), chunked)
            chosen, rejected = logps.float().chunk(2)
            margins.append((chosen - rejected).cpu())
    margin = torch.cat(margins) if margins else torch.zeros(0)
    return {
        "accuracy": 100.0 * float((margin > 0).float().mean()) if len(margin) else 0.0,
        "n": len(margin),
        "mean_logp_margin": float(margin.mean()) if len(margin) else 0.0,
    }


def parse_answer(text: str) -> object | None:
    """The JSON object at the start of a generated answer, or None if it does not parse."""
    text = text.strip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return obj


def exact_match(predictions: Iterable[str], references: Iterable[str]) -> list[bool]:
    """Per row: does the answer equal the reference? JSON references compare as parsed objects
    (spacing and key order do not matter), others as stripped strings."""
    hits = []
    for prediction, reference in zip(predictions, references, strict=True):
        expected = parse_answer(reference)
        if expected is None or not reference.strip().startswith(("{", "[")):
            hits.append(prediction.strip() == reference.strip())
        else:
            hits.append(parse_answer(prediction) == expected)
    return hits
