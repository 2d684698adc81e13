"""The chunked trained-position loss equals transformers' loss, in value and in LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from lit_lora.config.schema import LoraConfig, to_train_config
from lit_lora.data.batching import MODEL_KEYS, collate, pack
from lit_lora.data.demo import make_rows
from lit_lora.data.rendering import IGNORE_INDEX, Rendering, encode_conversation
from lit_lora.models.builder import build_model
from lit_lora.speedups.attention import segments_from_positions, use_lit_attention
from lit_lora.speedups.chunked_loss import supports_chunked_loss, trained_token_loss
from lit_lora.speedups.frozen_linears import cast_frozen_linears
from tests.helpers import alpaca_messages, compose_train, plain_config


@pytest.fixture(scope="module")
def built():
    model = build_model(plain_config(lora=LoraConfig(dropout=0.0)))
    torch.manual_seed(0)
    for name, param in model.model.named_parameters():
        if "lora_B" in name:  # non-zero B: LoRA must change the loss and receive gradients
            param.data.normal_(0, 0.02)
    return model


def _examples(tokenizer, n=6):
    rendering = Rendering.resolve(tokenizer)
    out = []
    for i, row in enumerate(make_rows(n, seed=4, held_out_names=False)):
        row = {**row, "input": row["input"] + " More." * (3 * i)}
        ids, labels = encode_conversation(tokenizer, rendering, alpaca_messages(row))
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_and_gradients_equal_transformers_loss(built, packed):
    model, tokenizer = built.model, built.tokenizer
    assert supports_chunked_loss(model)
    examples = _examples(tokenizer)
    batch = collate(pack(examples, 256) if packed else examples, tokenizer.pad_token_id)
    if packed:
        use_lit_attention(model)
    divisor = torch.tensor(7.0)  # any divisor, e.g. a step's token count / (accum x world)
    model.zero_grad()
    reference = model(
        **{k: batch[k] for k in MODEL_KEYS if k in batch}, num_items_in_batch=divisor, use_cache=False
    ).loss
    reference.backward()
    grads_ref = _lora_grads(model)
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    extra = {"packed_segments": segments_from_positions(batch["position_ids"])} if packed else {}
    chunked = trained_token_loss(model, inputs, batch["labels"], divisor, chunk=37, **extra)
    chunked.backward()
    grads = _lora_grads(model)
    assert (batch["labels"] == IGNORE_INDEX).any() and reference.item() > 0
    assert abs(chunked.item() - reference.item()) < 1e-4 * reference.item()
    for name, g in grads_ref.items():
        assert g.abs().max() > 0, name
        err = ((grads[name] - g).abs().max() / g.abs().max()).item()  # fp32 noise: ~1e-4
        assert err < 1e-3, name


def test_lora_on_lm_head_takes_transformers_loss():
    built = build_model(plain_config(lora=LoraConfig(target_modules=["q_proj", "lm_head"])))
    assert not supports_chunked_loss(built.model)


def test_activation_checkpointing_still_trains_lora_with_the_same_gradients():
    """The known trap: with checkpointing, LoRA B gets no gradient if the inputs do not require grad."""
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = to_train_config(
            compose_train(
                [
                    "model=tiny",
                    "output_dir=/tmp/unused",
                    "lora.dropout=0.0",
                    f"model.gradient_checkpointing={str(checkpointing).lower()}",
                    "speed=off",
                ]
            )
        )
        built = build_model(cfg)
        model = built.model
        model.train()
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B, or A's gradient is zero whatever happens
                param.data.normal_(0, 0.02)
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        batch = collate(_examples(built.tokenizer, 3), built.tokenizer.pad_token_id)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        trained_token_loss(model, inputs, batch["labels"], torch.tensor(10.0)).backward()
        grads[checkpointing] = _lora_grads(model)
    for name, g in grads[False].items():
        assert g.abs().max() > 0 and grads[True][name].abs().max() > 0, name
        assert torch.allclose(grads[True][name], g, rtol=1e-4, atol=1e-7), name


def test_bf16_frozen_linears_give_the_same_autocast_loss_and_keep_the_adapter_fp32(built):
    """Under bf16 autocast the frozen linears' matmuls see bf16 weights anyway: storing them in bf16
    changes nothing but the casts (and memory). Norms, embeddings and LoRA stay fp32."""
    model, tokenizer = built.model, built.tokenizer
    batch = collate(_examples(tokenizer, 3), tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def loss():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return trained_token_loss(model, inputs, batch["labels"], torch.tensor(10.0)).item()

    before = loss()
    assert cast_frozen_linears(model, torch.bfloat16) == 30 * 7  # q/k/v/o + gate/up/down in 30 layers
    after = loss()
    assert abs(after - before) < 1e-6 * abs(before)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n)
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16


def test_frozen_output_weight_is_cast_once_and_again_after_it_changes():
    from lit_lora.speedups.chunked_loss import _frozen_cast

    weight = torch.nn.Parameter(torch.randn(64, 16), requires_grad=False)
    first = _frozen_cast(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert _frozen_cast(weight, torch.bfloat16) is first, "a frozen weight is cast once"
    assert _frozen_cast(weight, torch.float32) is weight
    with torch.no_grad():
        weight.mul_(2)  # an in-place change moves the version counter: the copy is rebuilt
    again = _frozen_cast(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    assert not again.requires_grad
