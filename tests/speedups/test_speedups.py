"""The speed group: ``speed=off`` is plain transformers + PEFT, the defaults put lit-lora's paths on,
and the keys that moved to the group say where they went."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lit_lora.config.schema import SpeedConfig, to_train_config
from lit_lora.errors import UserError
from lit_lora.models.builder import build_model
from lit_lora.training.run import train
from tests.helpers import TINY, compose_train


def _patched_forwards(model: nn.Module) -> list[str]:
    """Modules whose forward was replaced on the instance (how every speed path routes a module)."""
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_speed_off_yaml_is_speed_config_off(tmp_path):
    tc = to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", "speed=off"]))
    assert tc.speed == SpeedConfig.off()
    assert to_train_config(compose_train([*TINY, f"output_dir={tmp_path}"])).speed == SpeedConfig()


def test_the_defaults_put_the_speed_paths_on(tmp_path):
    tc = to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", "trainer.precision=bf16-mixed"]))
    built = build_model(tc)
    assert built.speedups.on and built.speedups.lit_attention
    assert built.speedups.fused_lora_linear == built.speedups.fast_dropout == 2 * 4  # q/k/v/o, 2 layers
    assert built.speedups.autocast_dtype == torch.bfloat16 and built.speedups.frozen_linears_bf16 > 0
    assert _patched_forwards(built.model), "the fused LoRA linear and RMSNorm route modules per instance"
    plain = build_model(dataclasses.replace(tc, speed=SpeedConfig.off()))
    assert not plain.speedups.on and plain.speedups.autocast_dtype is None


def test_speed_off_trains_with_peft_and_transformers_own_forward_everywhere(tmp_path, monkeypatch):
    from peft.tuners.lora import Linear as LoraLinear

    calls = {"lora": 0}
    peft_forward = LoraLinear.forward

    def counting(self, *args, **kwargs):
        calls["lora"] += 1
        return peft_forward(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", counting)  # a spy: PEFT's forward still does the work
    overrides = [*TINY, f"output_dir={tmp_path}", "speed=off", "score=false", "trainer.precision=bf16-mixed"]
    result = train(compose_train(overrides))
    model = result.model
    assert result.summary["global_step"] == 4 and result.summary["speedups"]["on"] is False
    assert _patched_forwards(model) == []
    dropouts = [
        d
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
        for d in m.lora_dropout.values()
    ]
    assert dropouts and all(type(d) in (nn.Dropout, nn.Identity) for d in dropouts), "PEFT's own dropout"
    assert model.get_base_model().config._attn_implementation == "sdpa"
    frozen = [m.weight.dtype for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
    assert frozen and all(d == torch.float32 for d in frozen), "no bf16 storage of frozen linears"
    # Every LoRA layer ran PEFT's forward at every training step (8 layers x 4 steps, plus validation).
    assert calls["lora"] >= 8 * 4


def test_a_key_that_moved_to_the_speed_group_says_where(tmp_path, cli):
    with pytest.raises(UserError, match=r"model\.fused_rmsnorm is now speed\.fused_rmsnorm"):
        to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", "+model.fused_rmsnorm=false"]))
    done = cli("lora.fused_linear=false", f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr.strip().splitlines() == [
        "lit-lora: error: lora.fused_linear is now speed.fused_lora_linear (the speed group, lit_lora.speedups)"
    ]
