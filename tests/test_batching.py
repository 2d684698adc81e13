"""Padding, packing and length grouping; packing must not change what the model sees or learns."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_lora.attention import segments_from_positions, use_packed_attention
from lit_lora.batching import MODEL_KEYS, LengthGroupedSampler, collate, pack, padding_fraction
from lit_lora.config import ModelConfig
from lit_lora.demo import make_rows
from lit_lora.embedded import resolve
from lit_lora.model import load_tokenizer
from lit_lora.rendering import IGNORE_INDEX, Rendering, count_trained, encode_conversation
from tests.conftest import alpaca_messages


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path="embedded:smollm2-135m"), "embedded:smollm2-135m", True)


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
    model = AutoModelForCausalLM.from_pretrained(resolve("embedded:smollm2-135m"), dtype=torch.float32).eval()
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
    """lit_lora.attention runs SDPA per packed segment; it must compute what the block mask computes."""
    model = AutoModelForCausalLM.from_pretrained(resolve("embedded:smollm2-135m"), dtype=torch.float32)
    model.train()  # dropout is 0 in this config; gradients are compared too
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
    assert use_packed_attention(model)
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
