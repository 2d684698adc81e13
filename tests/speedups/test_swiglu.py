"""lit_lora.speedups.swiglu: the MLP product with the SiLU recomputed is transformers' function and
gradient bit for bit, saves one activation less, and is switched only where it computes that."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from lit_lora.speedups.swiglu import use_fused_swiglu
from tests.helpers import loss_and_grads, tiny_lora_model

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act="silu")


def _mlp(dtype=torch.float32) -> LlamaMLP:
    """A Llama MLP with frozen weights, as under LoRA."""
    torch.manual_seed(5)
    return LlamaMLP(CONFIG).to(dtype).train().requires_grad_(False)


def test_fused_model_equals_transformers_bitwise_in_fp32():
    ref_model = tiny_lora_model(r=4, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
    fused = copy.deepcopy(ref_model)
    assert use_fused_swiglu(fused) == 2  # one MLP per layer
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = loss_and_grads(ref_model, ids)
    loss, got = loss_and_grads(fused, ids)
    assert loss == ref_loss
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 3
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
        assert got[name].abs().sum() > 0, name


def test_bf16_output_and_input_gradient_are_bitwise_with_one_saved_activation_less():
    grads, saved = [], []
    x0 = torch.randn(3, 7, CONFIG.hidden_size, generator=torch.Generator().manual_seed(2))
    for fused in (False, True):
        mlp = _mlp()
        if fused:
            assert use_fused_swiglu(mlp) == 1
        big = []

        def pack(t, big=big, width=mlp.intermediate_size):
            if t.dim() == 3 and t.shape[-1] == width:  # activations, not weights
                big.append(t.untyped_storage().data_ptr())
            return t

        x = x0.clone().requires_grad_()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = mlp(x)
        out.float().square().sum().backward()
        saved.append(len(set(big)))
        grads.append([out, x.grad])
    assert saved == [3, 2]
    for want, got in zip(*grads, strict=True):
        assert torch.equal(want, got)


def _fused_in(out: torch.Tensor) -> bool:
    """Whether the autograd graph just below ``out`` holds the fused product."""
    return any(fn.name() == "_SiluMulBackward" for fn, _ in _walk(out.grad_fn))


def test_takes_the_class_forward_outside_cpu_training():
    mlp = _mlp()
    use_fused_swiglu(mlp)
    x = torch.randn(2, 5, mlp.hidden_size, requires_grad=True)
    assert _fused_in(mlp(x))
    with torch.no_grad():
        assert mlp(x).grad_fn is None
    assert not _fused_in(mlp.eval()(x))


def _walk(node, depth: int = 4):
    """The autograd nodes up to ``depth`` steps below ``node``."""
    found, frontier = [], [(node, 0)]
    while frontier:
        fn, d = frontier.pop()
        if fn is None or d > depth:
            continue
        found.append((fn, d))
        frontier.extend((child, d + 1) for child, _ in fn.next_functions)
    return found


class _GeluMLP(LlamaMLP):
    """A GELU-gated MLP under the same attribute names: a different function, not switched."""

    def __init__(self, config):
        super().__init__(config)
        self.act_fn = nn.GELU()


def test_only_mlps_computing_the_llama_function_are_switched():
    model = nn.Sequential(_mlp(), _GeluMLP(CONFIG))
    assert use_fused_swiglu(model) == 1
