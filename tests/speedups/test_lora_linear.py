"""lit_lora.speedups.lora_linear: the fused CPU LoRA linear computes PEFT's function, and only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_lora.config.schema import LoraConfig, ModelConfig, SpeedConfig, TrainConfig, TrainerConfig
from lit_lora.models.builder import build_model
from lit_lora.speedups import lora_linear
from lit_lora.speedups.dropout import keep_mask, keep_ones, use_fast_dropout
from lit_lora.speedups.lora_linear import _fused_forward, use_fused_lora_linear
from tests.helpers import TINY, compose_train, loss_and_grads, tiny_lora_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_keep_ones_keeps_the_elements_keep_mask_keeps(dtype):
    torch.manual_seed(3)
    mask = keep_mask((300, 77), 1638)
    torch.manual_seed(3)
    ones = keep_ones((300, 77), 1638, dtype)
    assert ones.dtype == dtype and set(ones.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ones == 1, mask)
    assert 0.9 < mask.float().mean() < 0.99


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_model_equals_peft_with_the_same_masks_in_fp32(tmp_path, dropout):
    peft = tiny_lora_model(r=4, dropout=dropout)
    use_fast_dropout(peft)
    fused = copy.deepcopy(peft)
    assert use_fused_lora_linear(fused) == 2 * 4  # q/k/v/o of 2 layers
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = loss_and_grads(peft, ids)
    loss, got = loss_and_grads(fused, ids)
    assert abs(loss - ref_loss) < 1e-5
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 4  # A and B of 8 layers
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-7), name
        assert got[name].abs().sum() > 0, name


def test_bf16_autocast_error_is_no_larger_than_peft_s(tmp_path):
    """Against an fp32 reference, the fused layer under bf16 autocast errs no more than PEFT's layer."""
    layer = tiny_lora_model(r=4, dropout=0.0).get_base_model().model.layers[1].self_attn.q_proj
    x0 = torch.randn(3, 17, layer.in_features, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 17, layer.out_features, generator=torch.Generator().manual_seed(2))

    def run(autocast: bool, fused: bool):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _fused_forward(layer, x) if fused else layer(x)
        assert ("LoraLinear" in type(out.grad_fn).__name__) == fused
        out.backward(grad)
        return [out.float(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    ref = run(False, False)
    for peft_value, fused_value, want in zip(run(True, False), run(True, True), ref, strict=True):
        peft_err = ((peft_value - want).norm() / want.norm()).item()
        fused_err = ((fused_value - want).norm() / want.norm()).item()
        assert peft_err < 0.02 and fused_err <= 1.5 * peft_err + 1e-3, (peft_err, fused_err)


def test_q_k_v_save_one_input_and_the_backward_draws_nothing_from_the_generator():
    """Under bf16 autocast each decoder layer saves 6 tensors of the input's size (q/k/v's input, o's
    input, 4 multipliers; PEFT's path: 8), and the backward leaves the generator where the forward left
    it (resume, seeds)."""
    model = tiny_lora_model(r=4, dropout=0.1)
    use_fast_dropout(model)
    use_fused_lora_linear(model)
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    hidden = model.get_base_model().config.hidden_size
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and t.dim() == 2 and t.shape == (ids.numel(), hidden):
            saved[t.untyped_storage().data_ptr()] = t
        return t

    torch.manual_seed(11)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert len(saved) == 2 * 6  # 2 layers x (q/k/v's input, o's input, 4 multipliers)
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_only_plain_cpu_training_calls_take_the_fused_path(tmp_path, monkeypatch):
    model = tiny_lora_model(r=4, dropout=0.1)
    use_fused_lora_linear(model)
    calls = []
    apply = lora_linear._LoraLinear.apply
    monkeypatch.setattr(lora_linear._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = torch.randint(3, 4000, (1, 9))

    def fused_calls() -> int:
        calls.clear()
        model(input_ids=ids, use_cache=False)
        return len(calls)

    assert fused_calls() == 8
    with torch.no_grad():
        assert fused_calls() == 0
    model.eval()
    assert fused_calls() == 0
    model.train()
    with model.disable_adapter():
        assert fused_calls() == 0
    # A bf16 base with an fp32 LoRA outside autocast: PEFT computes in two dtypes, so PEFT computes.
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    layer.base_layer.to(torch.bfloat16)
    calls.clear()
    out = layer(torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16))
    assert not calls and out.dtype == torch.bfloat16
    # A trainable base weight (or bias) needs gradients the fused function does not give.
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    layer.base_layer.weight.requires_grad_(True)
    layer(torch.randn(2, 5, layer.in_features))
    assert not calls


def test_the_builder_routes_it_per_speed_config(tmp_path):
    from peft.tuners.lora import Linear

    model_cfg = ModelConfig(**dict(compose_train([*TINY, f"output_dir={tmp_path}"]).model))
    cases = [({}, {}, 8), ({"fused_lora_linear": False}, {}, 0), ({"fast_dropout": False}, {}, 0)]
    cases.append(({"fast_dropout": False}, {"dropout": 0.0}, 8))  # no masks: nothing to disagree on
    for speed, lora, expected in cases:
        cfg = TrainConfig(
            model=model_cfg,
            lora=LoraConfig(r=4, **lora),
            speed=SpeedConfig(**speed),
            trainer=TrainerConfig(precision="32"),
        )
        built = build_model(cfg)
        routed = [m for m in built.model.modules() if isinstance(m, Linear) and "forward" in vars(m)]
        assert len(routed) == expected == built.speedups.fused_lora_linear, (speed, lora)
