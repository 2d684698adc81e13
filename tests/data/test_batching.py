"""Padding, packing and length grouping; packing must not change what the model sees or learns."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_lora.data.batching import (
    MODEL_KEYS,
    LengthGroupedSampler,
    collate,
    is_right_padded,
    pack,
    padding_fraction,
)
from lit_lora.data.demo import make_rows
from lit_lora.data.rendering import IGNORE_INDEX, Rendering, count_trained, encode_conversation
from lit_lora.models.embedded import resolve
from lit_lora.speedups.attention import segments_from_positions, use_lit_attention
from tests.helpers import alpaca_messages


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Demo rows of varied lengths (some with long padding-like tails in the input)."""
    rendering = Rendering.resolve(tokenizer)
    rng = random.Random(0)
    out = []
    for row in make_rows(10, seed=3, held_out_names=False):
        row = {**row, "input": row["input"] + " Also noted." * rng.randint(0, 12)}
        ids, labels = encode_conversation(tokenizer, rendering, alpaca_messages(row))
        out.append({"input_ids": ids, "labels": labels})
    return out


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


# The model tests below run the embedded SmolLM2 cut to its first LAYERS decoder layers: its real weights,
# heads (9 query, 3 key/value), RoPE, final norm, tied head and tokenizer, at about a third of the cost of
# all 30 layers. Every layer runs the same attention code, so what they compare (packed vs padded rows,
# segment attention vs the block mask, the plain path vs SDPA, with or without the padding mask) shows in
# six layers as in thirty. transformers reports the other layers' weights as unused.
LAYERS = 6


def _real_model(dtype: torch.dtype):
    """The embedded SmolLM2's first :data:`LAYERS` layers, in ``dtype``."""
    path = resolve("embedded:smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, num_hidden_layers=LAYERS)
    assert len(model.model.layers) == LAYERS
    return model


def _only_grad(model, weight: torch.Tensor) -> None:
    """Only ``weight``'s gradient is compared: the others (the tied 49k-token embedding's above all) are
    not computed. Its gradient still goes through the backward of every layer after its own."""
    model.requires_grad_(False)
    weight.requires_grad_(True)


def test_collate_pads_right_with_masked_labels(examples, tokenizer):
    batch = collate(examples[:3], tokenizer.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for i, e in enumerate(examples[:3]):
        n = len(e["input_ids"])
        assert batch["attention_mask"][i, n:].sum() == 0 and batch["attention_mask"][i, :n].all()
        assert torch.all(batch["labels"][i, n:] == IGNORE_INDEX)
    assert torch.equal(batch["token_mask"], batch["attention_mask"])


def test_pack_keeps_every_example_once_within_capacity(examples):
    packed = pack(examples, 256)
    assert len(packed) < len(examples)
    segments = []
    for row in packed:
        assert len(row["input_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for s, e in itertools.pairwise(starts):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX, "an example's first token is never predicted"
            segments.append(tuple(row["input_ids"][s:e]))
    assert sorted(segments) == sorted(tuple(e["input_ids"]) for e in examples)
    assert sum(count_trained(r["labels"]) for r in packed) == sum(
        count_trained(e["labels"]) for e in examples
    )


def test_packed_loss_and_logits_equal_unpacked_on_the_real_model(examples, tokenizer):
    model = _real_model(torch.float32).eval()
    plain = collate(examples, tokenizer.pad_token_id)
    packed_rows = pack(examples, 256)
    packed = collate(packed_rows, tokenizer.pad_token_id)
    assert "attention_mask" not in packed and "position_ids" in packed
    with torch.no_grad():
        loss_plain = model(**_model_inputs(plain), use_cache=False).loss
        loss_packed = model(**_model_inputs(packed), use_cache=False).loss
        assert abs(loss_plain.item() - loss_packed.item()) < 1e-4
        # No example attends to its neighbours: each segment's logits equal the example run alone.
        row = packed_rows[0]
        logits = model(**_model_inputs(collate([row], tokenizer.pad_token_id)), use_cache=False).logits[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert len(starts) > 2, "the first packed row must hold several examples"
        for s, e in itertools.pairwise(starts):
            alone = model(input_ids=torch.tensor([row["input_ids"][s:e]]), use_cache=False).logits[0]
            assert (logits[s:e] - alone).abs().max() < 1e-3


def test_segment_attention_equals_the_masked_sdpa_path_in_loss_logits_and_gradients(examples, tokenizer):
    """lit_lora.speedups.attention runs SDPA per packed segment; it must compute what the block mask computes."""
    model = _real_model(torch.float32)
    model.train()  # dropout is 0 in this config; gradients are compared too
    _only_grad(model, model.model.layers[3].self_attn.q_proj.weight)
    packed = collate(pack(examples, 256), tokenizer.pad_token_id)
    inputs = _model_inputs(packed)
    segments = segments_from_positions(packed["position_ids"])
    assert max(len(s) for s in segments) > 2, "rows must hold several examples"

    def run():
        model.zero_grad()
        out = model(**inputs, packed_segments=segments, use_cache=False)
        out.loss.backward()
        grad = model.model.layers[3].self_attn.q_proj.weight.grad.clone()
        return out.loss.detach(), out.logits.detach(), grad

    loss_mask, logits_mask, grad_mask = run()  # sdpa: packed_segments is ignored, the block mask acts
    assert use_lit_attention(model)
    loss_seg, logits_seg, grad_seg = run()
    real = packed["token_mask"].bool()
    assert abs(loss_mask.item() - loss_seg.item()) < 1e-5
    assert (logits_mask[real] - logits_seg[real]).abs().max() < 1e-3
    assert torch.allclose(grad_mask, grad_seg, rtol=1e-3, atol=1e-6)
    # Calls without segments (plain batches, generation) still take SDPA with its padding mask.
    plain = _model_inputs(collate(examples[:3], tokenizer.pad_token_id))
    with torch.no_grad():
        model.eval()
        switched = model(**plain, use_cache=False).loss
        model.set_attn_implementation("sdpa")
        assert abs(switched.item() - model(**plain, use_cache=False).loss.item()) < 1e-6


@pytest.mark.parametrize("kind", ["causal-bias", "causal-bool", "padded"])
def test_plain_attention_equals_sdpa_with_grouped_heads_and_masks(kind):
    """The short-sequence path (lit_lora.speedups.attention._plain_attention) in fp32, where any error shows:
    the cached additive causal bias, a boolean (T, T) mask and the padded (B, 1, T, T) mask."""
    from torch.nn import functional as F

    from lit_lora.speedups.attention import CAUSAL, _plain_attention

    torch.manual_seed(0)
    q = torch.randn(2, 9, 40, 64, requires_grad=True)  # SmolLM2's heads: 9 query, 3 key/value
    k = torch.randn(2, 3, 40, 64, requires_grad=True)
    v = torch.randn(2, 3, 40, 64, requires_grad=True)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    if kind == "padded":  # the boolean (B, 1, T, T) mask transformers' sdpa_mask builds for right padding
        mask = mask[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, 31:] = False
    allowed = CAUSAL if kind == "causal-bias" else mask
    grad = torch.randn(2, 9, 40, 64)
    results = []
    for attend in (
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True),
        lambda: _plain_attention(q, k, v, allowed, 0.125),
    ):
        q.grad = k.grad = v.grad = None
        out = attend()
        out.backward(grad)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for ref, got in zip(*results, strict=True):
        assert (ref - got).abs().max() < 1e-4


def test_short_16bit_sequences_take_the_plain_path_and_match_sdpa(examples, tokenizer, monkeypatch):
    """bf16 training on a CPU: plain attention for padded and packed batches, close to SDPA's result."""
    from lit_lora.speedups import attention

    calls = []
    real = attention._plain_attention
    monkeypatch.setattr(attention, "_plain_attention", lambda *a: calls.append(1) or real(*a))
    model = _real_model(torch.bfloat16)
    model.train()  # attention dropout is 0 in this config
    layer = model.model.layers[3].self_attn.q_proj.weight
    _only_grad(model, layer)
    for batch in (
        collate(examples[:4], tokenizer.pad_token_id),
        collate(pack(examples, 256), tokenizer.pad_token_id),
    ):
        inputs = _model_inputs(batch)
        if "position_ids" in batch:
            inputs["packed_segments"] = segments_from_positions(batch["position_ids"])
        runs = []
        for max_len in (0, 512):  # 0: every call goes to transformers' SDPA
            assert use_lit_attention(model, max_len)
            calls.clear()
            model.zero_grad()
            out = model(**inputs, use_cache=False)
            out.loss.backward()
            runs.append((out.loss.item(), layer.grad.float().flatten(), len(calls)))
        (loss_sdpa, grad_sdpa, n_sdpa), (loss_plain, grad_plain, n_plain) = runs
        assert n_sdpa == 0 and n_plain >= LAYERS, (
            "the plain path must run in every layer, and only when asked"
        )
        assert abs(loss_sdpa - loss_plain) < 0.02 * abs(loss_sdpa)  # bf16 rounding, not a different function
        assert _cosine(grad_sdpa, grad_plain) > 0.99


def test_right_padding_mask_is_left_out_only_where_it_changes_nothing():
    from lit_lora.training.module import LitLoRA

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": right}
    assert is_right_padded(right) and "attention_mask" not in LitLoRA._model_inputs(batch, False)
    assert "attention_mask" in LitLoRA._model_inputs(batch, False, right_padding_mask=True)
    for kept in ([[1, 1, 1, 1], [0, 0, 1, 1]], [[1, 0, 1, 1], [1, 1, 1, 1]]):  # left padding, a gap
        mask = torch.tensor(kept)
        assert not is_right_padded(mask)
        assert LitLoRA._model_inputs({**batch, "attention_mask": mask}, False)["attention_mask"] is mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_right_padded_batch_without_its_mask_has_the_same_loss_and_gradients(examples, tokenizer, dtype):
    """fp32: SDPA with the padding mask vs causal-only SDPA; bf16: the plain path's boolean mask vs its
    cached causal bias. Real positions never see the padding after them, so nothing changes."""
    from lit_lora.training.module import LitLoRA

    model = _real_model(dtype).train()
    assert use_lit_attention(model, 512)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    assert not batch["attention_mask"].all(), "the batch must be padded"
    # A middle layer (layer 5 of 30 before the model was cut): its gradient goes through the masked and the
    # causal attention's backward in the layers after it.
    layer = model.model.layers[3].self_attn.v_proj.weight
    _only_grad(model, layer)
    runs = []
    for keep in (True, False):
        inputs = LitLoRA._model_inputs(batch, with_labels=True, right_padding_mask=keep)
        assert ("attention_mask" in inputs) == keep
        model.zero_grad()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        runs.append((loss.item(), layer.grad.float().flatten().clone()))
    (loss_mask, grad_mask), (loss_causal, grad_causal) = runs
    assert grad_mask.abs().sum() > 0
    if dtype == torch.float32:
        assert abs(loss_mask - loss_causal) < 1e-5
        assert torch.allclose(grad_mask, grad_causal, rtol=1e-4, atol=1e-6)
    else:  # the bias is added inside the bf16 matmul, the boolean mask after it: a rounding apart
        assert abs(loss_mask - loss_causal) < 1e-3 * abs(loss_mask)
        assert _cosine(grad_mask, grad_causal) > 0.999


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(400)]
    fake = [{"input_ids": [0] * n} for n in lengths]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=5, group=10)
    order = list(sampler)
    assert sorted(order) == list(range(400)) and order == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != order, "each epoch draws a new order"
    shuffled = list(range(400))
    random.Random(5).shuffle(shuffled)
    grouped = padding_fraction([fake[i] for i in order], 8)
    plain = padding_fraction([fake[i] for i in shuffled], 8)
    assert grouped < plain / 3
