"""lit_lora.speedups.rmsnorm: the fused CPU RMSNorm computes transformers' function and gradient, and only where it may."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lit_lora.speedups.rmsnorm import use_fused_rmsnorm
from tests.helpers import loss_and_grads, tiny_lora_model


def _norm(dtype=torch.float32) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    norm.weight.requires_grad_(False)
    return norm.train()


def test_fused_model_equals_transformers_in_fp32(tmp_path):
    ref_model = tiny_lora_model(r=4, dropout=0.0)
    fused = copy.deepcopy(ref_model)
    assert use_fused_rmsnorm(fused) == 2 * 2 + 1  # two per layer, the final norm
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = loss_and_grads(ref_model, ids)
    loss, got = loss_and_grads(fused, ids)
    assert abs(loss - ref_loss) < 1e-6
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 4
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-8), name
        assert got[name].abs().sum() > 0, name


def test_bf16_output_is_bitwise_and_gradient_no_less_accurate():
    norm, fused = _norm(torch.bfloat16), _norm(torch.bfloat16)
    assert use_fused_rmsnorm(fused) == 1
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(2)) * 3
    grad = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    x64 = x.double().requires_grad_()
    want = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    want.backward(grad.double())
    outs, errors = [], []
    for module in (norm, fused):
        xb = x.bfloat16().requires_grad_()
        out = module(xb)
        out.backward(grad)
        outs.append(out)
        errors.append((xb.grad.double() - x64.grad).abs().mean().item())
    assert outs[1].grad_fn.name() == "_RMSNormBackward" and outs[0].grad_fn.name() != "_RMSNormBackward"
    assert torch.equal(outs[0], outs[1])
    assert errors[1] <= errors[0] * 1.05 + 1e-6, errors


def test_takes_the_class_forward_outside_cpu_training_with_a_frozen_weight():
    norm = _norm()
    use_fused_rmsnorm(norm)
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert norm(x).grad_fn.name() == "_RMSNormBackward"
    with torch.no_grad():
        assert norm(x).grad_fn is None
    assert norm.eval()(x).grad_fn.name() != "_RMSNormBackward"
    norm.train().weight.requires_grad_(True)  # a trainable norm needs its weight's gradient
    assert norm(x).grad_fn.name() != "_RMSNormBackward"


class _OnePlusWeightRMSNorm(LlamaRMSNorm):
    """Gemma's variant: scales by ``1 + weight``, a different function under the same attributes."""

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x * (1.0 + self.weight.float())).to(hidden_states.dtype)


def test_only_classes_computing_the_llama_function_are_switched():
    model = nn.Sequential(_norm(), _OnePlusWeightRMSNorm(64), nn.LayerNorm(64))
    assert use_fused_rmsnorm(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
