"""lit_lora.speedups.dropout: CPU LoRA dropout drawn as rand() >= p: nn.Dropout's distribution, cheaper masks."""

from __future__ import annotations

import torch
from torch import nn

from lit_lora.config.schema import LoraConfig
from lit_lora.models.builder import build_model
from lit_lora.speedups.dropout import FastDropout, use_fast_dropout
from tests.helpers import plain_config


def test_keeps_one_minus_p_of_the_inputs_scaled_and_masks_the_gradient_alike():
    torch.manual_seed(0)
    drop = FastDropout(0.2).train()
    x = torch.randn(1000, 1000, requires_grad=True)
    out = drop(x)
    kept = out != 0
    keep = 1 - round(0.2 * 2**15) / 2**15  # the realised probability: p on a 2**-15 grid
    assert abs(keep - 0.8) < 2**-15
    assert abs(kept.float().mean().item() - keep) < 0.002  # 1e6 draws: 5 standard deviations = 0.002
    assert torch.allclose(out[kept], x.detach()[kept] / keep)
    out.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the same mask in the backward
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / keep))
    # bf16 in, bf16 out (the mask is drawn in fp32, so p is not rounded to bf16).
    assert drop(torch.ones(8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_every_lane_of_the_random_words_is_used_uniformly():
    """Four elements share one 64-bit draw: each position modulo 4 must be kept at the same rate."""
    torch.manual_seed(1)
    kept = FastDropout(0.5).train()(torch.ones(4_000_001)).ne(0).float()
    for lane in range(4):
        assert abs(kept[lane::4].mean().item() - 0.5) < 0.003  # 1e6 draws each: 6 standard deviations


def test_draws_from_the_global_generator_and_is_the_identity_in_eval():
    x = torch.ones(64, 64)
    drop = FastDropout(0.5).train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(first, drop(x)), "seeded runs (and resumed ones) must draw the same masks"
    assert not torch.equal(first, drop(x)), "consecutive calls draw new masks"
    assert torch.equal(drop.eval()(x), x)


def test_replaces_every_peft_lora_dropout_and_lora_still_trains():
    built = build_model(plain_config(lora=LoraConfig(r=4, dropout=0.1)))
    model = built.model
    assert use_fast_dropout(model) == 30 * 4  # q/k/v/o of 30 layers
    dropouts = [
        d
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
        for d in m.lora_dropout.values()
    ]
    assert dropouts and all(type(d) is FastDropout and d.p == 0.1 for d in dropouts)
    model.train()
    ids = built.tokenizer("LoRA adapters learn a low-rank update.", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_no_dropout_layers_are_left_alone():
    built = build_model(plain_config(lora=LoraConfig(r=4, dropout=0.0)))
    assert use_fast_dropout(built.model) == 0
