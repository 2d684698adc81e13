"""The model builder on tiny random-init models: frozen base, trainable adapter, targets, quantization."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from lit_lora.config.device import check_device
from lit_lora.config.schema import SpeedConfig, to_train_config
from lit_lora.data.demo import make_rows
from lit_lora.errors import UserError
from lit_lora.models.builder import BaseConfig, build_model, resolve_targets, stored_dtype
from tests.helpers import TINY, compose_train, demo_batch


def _build(tmp_path, *overrides):
    tc = to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", *overrides]))
    return build_model(dataclasses.replace(tc, speed=SpeedConfig.off()))


def _batch(tokenizer, n=4):
    rows = make_rows(n, seed=7, held_out_names=False)
    return demo_batch(tokenizer, rows, 128)


def _loss(model, batch):
    return model(**batch).loss


def test_only_lora_parameters_require_grad(tmp_path):
    built = _build(tmp_path)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable, "the adapter must have trainable parameters"
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 layers x 4 attention projections x (A and B)
    assert len(trainable) == 2 * 4 * 2
    assert built.trainable_params == sum(
        p.numel() for n, p in built.model.named_parameters() if n in trainable
    )
    assert 0 < built.trainable_pct < 5


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    built = _build(tmp_path, "lora.r=16")
    model, batch = built.model, _batch(built.tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = _loss(model, batch).item()
    for _ in range(30):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    last = _loss(model, batch).item()
    # The tiny model's frozen head has weights of std 0.02 after a unit-RMS norm, which caps how far
    # an adapter can move its logits: from ln(49152) = 10.8 the loss can only fall by about a nat.
    assert last < first - 0.3, (first, last)


@pytest.mark.bnb
def test_nf4_base_stays_uint8_and_bit_identical_while_lora_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    built = _build(tmp_path, "quant=nf4", "lora.init=gaussian")
    model = built.model
    quantized = {n: p for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert quantized, "nf4 must replace the targeted linear layers' weights with 4-bit parameters"
    assert all(p.dtype == torch.uint8 for p in quantized.values())
    batch = _batch(built.tokenizer)
    # bitsandbytes repacks 4-bit weights once, on the first CPU forward, into its CPU kernel's layout
    # (still uint8, same bits per weight); snapshot after that so the check is about training.
    with torch.no_grad():
        _loss(model, batch)
    before = {n: p.detach().clone() for n, p in quantized.items()}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    for n, p in quantized.items():
        assert p.dtype == torch.uint8
        assert torch.equal(p, before[n]), f"{n} changed"
    changed = [n for n, p in lora.items() if not torch.equal(p, lora_before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_gpt2_article_targets_fail_naming_c_attn_without_download(tmp_path):
    started = time.perf_counter()
    tc = to_train_config(
        compose_train(["model=gpt2", "lora.target_modules=[q_proj,v_proj]", f"output_dir={tmp_path}"])
    )
    with pytest.raises(UserError, match="c_attn") as info:
        build_model(tc)
    assert "q_proj" in str(info.value)
    # Checked on a weightless skeleton: no hub access, so this is quick even offline.
    assert time.perf_counter() - started < 20


def test_attention_preset_per_architecture():
    assert resolve_targets(
        ["attention"], "gpt2", ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj"]
    ) == [
        "c_attn",
        "attn.c_proj",
    ]
    llama = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert resolve_targets(["attention"], "llama", llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(["all-linear"], "llama", llama) == "all-linear"
    with pytest.raises(UserError, match="no 'attention' target preset"):
        resolve_targets(["attention"], "some_new_arch", llama)


def test_all_linear_targets_mlp_too(tmp_path):
    built = _build(tmp_path, "lora=all-linear")
    names = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert any("mlp.gate_proj" in n for n in names) and any("self_attn.q_proj" in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_dora_and_rslora_build(tmp_path):
    built = _build(tmp_path, "lora.use_dora=true", "lora.use_rslora=true")
    assert any("lora_magnitude_vector" in n for n, _ in built.model.named_parameters())


def test_unknown_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        _build(tmp_path, "model.random_init=false", f"model.name_or_path={tmp_path}/missing")


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora", "loftq"])
def test_every_lora_init_builds_and_trains_only_the_adapter(tmp_path, init):
    if init == "loftq" and not torch.cuda.is_available():
        with pytest.raises(UserError, match="loftq needs a CUDA device"):
            _build(tmp_path, f"lora.init={init}")
        return
    built = _build(tmp_path, f"lora.init={init}")
    assert built.trainable_params > 0
    lora_b = [p for n, p in built.model.named_parameters() if "lora_B" in n]
    # Only PEFT's default and gaussian inits start with B = 0; the SVD-based ones start from the base.
    assert all(torch.count_nonzero(p) == 0 for p in lora_b) == (init in ("default", "gaussian"))


def test_cpu_only_options_fail_with_the_fix(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only messages")
    for override, fix in [
        ("trainer.precision=16-mixed", "bf16-mixed"),
        ("optim=paged_adamw_8bit", "optim=adamw"),
    ]:
        typed = to_train_config(compose_train([override, f"output_dir={tmp_path}"]))  # composes on CPU
        with pytest.raises(UserError, match=fix):
            check_device(typed)


@pytest.mark.bnb
@pytest.mark.parametrize(("quant", "layer"), [("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_other_quantizations_train_the_adapter_on_cpu(tmp_path, quant, layer):
    pytest.importorskip("bitsandbytes")
    built = _build(tmp_path, f"quant={quant}", "lora.init=gaussian")
    assert any(type(m).__name__ == layer for m in built.model.modules())
    lora = [p for p in built.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in lora]
    opt = torch.optim.AdamW(lora, lr=1e-2)
    _loss(built.model, _batch(built.tokenizer)).backward()
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(lora, before, strict=True))


def test_stored_dtype_holds_every_stored_weight_exactly(tmp_path):
    def folder(name, tensors):
        path = tmp_path / name
        path.mkdir()
        if tensors:
            save_file(tensors, str(path / "model.safetensors"))
        return str(path)

    bf16, fp16 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16)
    ids = torch.zeros(2, dtype=torch.int64)  # an integer buffer says nothing about the weights' precision
    no_dtype = LlamaConfig()
    no_dtype.dtype = None
    assert stored_dtype(folder("bf16", {"w": bf16, "ids": ids}), no_dtype) == torch.bfloat16
    assert stored_dtype(folder("mixed", {"w": bf16, "v": fp16}), no_dtype) == torch.float32
    assert (
        stored_dtype(folder("none", {}), LlamaConfig(dtype="float16")) == torch.float16
    )  # config.json's word
    assert stored_dtype("some/hub-id", no_dtype) == torch.float32  # transformers' default


def test_an_export_loads_the_base_as_stored_whatever_model_dtype_says(tmp_path):
    tc = to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", "model.dtype=bfloat16"]))
    base = BaseConfig(tc.model, tc.quant)
    assert build_model(base).model.dtype == torch.bfloat16  # training's copy
    # The tiny model's folder is stored in float32: an export never starts from the bf16 copy.
    assert build_model(base, export_dtype=torch.bfloat16).model.dtype == torch.float32
    assert build_model(base, export_dtype=torch.float64).model.dtype == torch.float64
