"""The retention probe (callbacks/retention.py) on the tiny model: its KL against an independent
computation, zero for an adapter with B = 0 and growing as the adapter is scaled up; the probe cache and
what invalidates it; checkpoint choice by a criterion that includes drift."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from lit_lora.callbacks.adapter_checkpoint import AdapterCheckpoint, parse_criterion
from lit_lora.callbacks.retention import Retention, load_probes, model_identity, probe_key, shares_prefix
from omegaconf import OmegaConf

from lit_lora.config.schema import ModelConfig, OptimConfig
from lit_lora.data.rendering import Rendering
from lit_lora.errors import UserError
from lit_lora.models.builder import build_model
from lit_lora.speedups import attention
from lit_lora.speedups.attention import use_lit_attention
from lit_lora.training.module import LitLoRA
from tests.helpers import compose_train, plain_config

TINY_MODEL = OmegaConf.to_container(compose_train(["model=tiny"]).model, resolve=True)


def _tiny_module(**model) -> LitLoRA:
    """A LitLoRA module on the tiny model with non-zero B, on lit-lora's attention (what training puts
    on a model: the probe's prefix then rides in row 0)."""
    built = build_model(plain_config(model=ModelConfig(**{**TINY_MODEL, **model})))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # small: a perturbation, not a takeover of the residual stream
    assert use_lit_attention(built.model, eager_max_len=192)
    rendering = Rendering.resolve(built.tokenizer)
    return LitLoRA(built.model, OptimConfig(), tokenizer=built.tokenizer, rendering=rendering)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny LitLoRA module (:func:`_tiny_module`), a CPU trainer, and a probe built from its base
    (cached under a temporary folder)."""
    module = _tiny_module()
    trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False)
    probe = Retention(max_new_tokens=6, cache_dir=str(tmp_path_factory.mktemp("probe-cache")))
    probe.model_cfg = OmegaConf.create(TINY_MODEL)
    probe.build_probes(module)
    return module, trainer, probe


def _lora_b(module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.model.named_parameters() if "lora_B" in n]


@contextlib.contextmanager
def _layout(probe, inline: bool):
    """The probe measured with its prefix in the first row (one forward) or as a cache (two)."""
    saved = (probe.inline, probe._batches_kept, probe._base)
    probe.inline, probe._batches_kept, probe._base = inline, None, None
    try:
        yield probe
    finally:
        probe.inline, probe._batches_kept, probe._base = saved


@pytest.mark.parametrize("inline", [True, False], ids=["prefix in row 0", "prefix as a cache"])
def test_kl_agreement_and_nll_ratio_match_an_independent_computation(tiny, inline):
    module, trainer, probe = tiny
    assert shares_prefix(module.model), "the tiny model runs lit-lora's attention: inline is the default"
    with _layout(probe, inline):
        measured = probe.measure(trainer, module)
        batches = probe._batches_kept
    rows = sum(b.inputs["input_ids"].shape[0] for b in batches)
    assert rows < len(probe.sequences), "packed: fewer rows than sequences"
    kls, agree, nll_tuned, nll_base = [], [], [], []
    model = module.model.eval()
    with torch.no_grad():
        for prompt, cont in probe.sequences:  # one sequence at a time, full logits, float64
            ids = torch.tensor([prompt + cont])
            tuned = model(input_ids=ids).logits[0].double().log_softmax(-1)
            with model.disable_adapter():
                base = model(input_ids=ids).logits[0].double().log_softmax(-1)
            rows = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1)
            kls.append(F.kl_div(tuned[rows], base[rows], log_target=True, reduction="none").sum(-1))
            agree.append(tuned[rows].argmax(-1) == base[rows].argmax(-1))
            targets = torch.tensor(cont)[:, None]
            nll_tuned.append(-tuned[rows].gather(1, targets))
            nll_base.append(-base[rows].gather(1, targets))
    assert measured["retention/kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4, abs=1e-7)
    assert measured["retention/agreement"] == pytest.approx(float(torch.cat(agree).double().mean()))
    ratio = float(torch.cat(nll_tuned).mean() / torch.cat(nll_base).mean())
    assert measured["retention/nll_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert measured["retention/kl"] > 1e-4, "this adapter (B != 0) moves the model"
    # The probe's tokens are the base's greedy continuation (ties aside): the base agrees with itself.
    assert all(len(c) == 6 for _, c in probe.sequences)


def test_the_prefix_in_row_0_gives_the_cached_prefix_logits_through_the_bf16_plain_path(tiny, monkeypatch):
    """Under bf16 autocast on a CPU the inline layout runs lit-lora's plain attention with the shared
    prefix's keys put in front of every row, the cache layout runs SDPA: the same logits within bf16
    rounding, while the same rows with the prefix hidden from them are far off."""
    _, _, fp32 = tiny
    module = _tiny_module(dtype="bfloat16")  # bf16 weights, as the default run's: queries stay bf16
    probe = Retention()
    probe.sequences = fp32.sequences
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    calls = []
    real = attention._plain_attention
    monkeypatch.setattr(attention, "_plain_attention", lambda *a: calls.append(a[1].shape) or real(*a))
    model = module.model.eval()
    try:
        inline = probe._batches(module.device, inline=True)
        cached = probe._batches(module.device, inline=False)
        size = len(inline[0].prefix)
        assert size > 0 and all(b.inputs["input_ids"][0, :size].tolist() == b.prefix for b in inline)
        with_prefix = torch.cat([probe._logits(trainer, module, b) for b in inline])
        width = inline[0].inputs["input_ids"].shape[1]  # one batch: the probe has fewer than 32 prompts
        assert len(inline) == 1 and calls and all(keys[2] == size + width for keys in calls), calls
        reference = torch.cat([probe._logits(trainer, module, b) for b in cached])
        hidden = []
        for b in inline:  # the prefix's columns masked for every query but the prefix's own
            mask = b.inputs["attention_mask"].clone()
            mask[1:, :, :, :size] = False
            mask[0, :, size:, :size] = False
            mask[..., size:].diagonal(dim1=-2, dim2=-1).fill_(True)  # nobody left with nothing to read
            hidden.append(
                probe._logits(trainer, module, replace(b, inputs={**b.inputs, "attention_mask": mask}))
            )
    finally:
        model.train()
    off = (with_prefix - reference).abs().max()
    assert off < 0.05 * reference.abs().max(), (float(off), float(reference.abs().max()))
    assert (torch.cat(hidden) - reference).abs().max() > 10 * off


def test_a_probe_without_a_shared_prefix_packs_with_padding(tiny):
    """Prompts that share no first token (another chat template, or none): packed rows with padding and
    no prefix for it to read; both layouts give the same finite figures."""
    module, trainer, fp32 = tiny
    size = len(fp32._prefix())
    sequences = [(prompt[size + i % 3 :], cont) for i, (prompt, cont) in enumerate(fp32.sequences)]
    figures = []
    for inline in (True, False):
        probe = Retention()
        probe.sequences, probe.inline = sequences, inline
        assert probe._prefix() == []
        batches = probe._batches(module.device, inline)
        tokens = sum(len(prompt) + len(cont) - 1 for prompt, cont in sequences)
        assert tokens < sum(b.inputs["input_ids"].numel() for b in batches), "some row is padded"
        figures.append(probe.measure(trainer, module))
    assert all(math.isfinite(v) for v in figures[0].values()) and figures[0]["retention/kl"] > 0
    assert figures[0] == pytest.approx(figures[1], rel=1e-5)


def test_probe_lengths_must_be_positive():
    with pytest.raises(UserError, match="max_new_tokens must be a whole number >= 1"):
        Retention(max_new_tokens=0)
    with pytest.raises(UserError, match="batch_size must be a whole number >= 1"):
        Retention(batch_size=-1)


def test_kl_is_zero_with_b_zero_and_grows_as_the_adapter_is_scaled_up(tiny):
    module, trainer, probe = tiny
    saved = [p.detach().clone() for p in _lora_b(module)]
    try:
        figures = {}
        for scale in (0.0, 0.5, 1.0, 2.0):
            with torch.no_grad():
                for param, value in zip(_lora_b(module), saved, strict=True):
                    param.copy_(value * scale)
            figures[scale] = probe.measure(trainer, module)
        zero = figures[0.0]
        assert zero["retention/kl"] == pytest.approx(0.0, abs=1e-7)
        assert zero["retention/agreement"] == 1.0
        assert zero["retention/nll_ratio"] == pytest.approx(1.0, abs=1e-6)
        kls = [figures[s]["retention/kl"] for s in (0.0, 0.5, 1.0, 2.0)]
        assert kls == sorted(kls) and len(set(kls)) == 4, kls
    finally:
        with torch.no_grad():
            for param, value in zip(_lora_b(module), saved, strict=True):
                param.copy_(value)


def test_probe_continuations_are_cached_and_invalidated_by_what_changes_them(tiny, tmp_path):
    module, _, probe = tiny
    again = Retention(max_new_tokens=6, cache_dir=probe.cache_dir)
    again.model_cfg = probe.model_cfg
    again.build_probes(module)
    assert again.cache_hit is True and again.sequences == probe.sequences
    longer = Retention(max_new_tokens=7, cache_dir=probe.cache_dir)
    longer.model_cfg = probe.model_cfg
    longer.build_probes(module)
    assert longer.cache_hit is False and all(
        c[:6] == s[1] for c, s in zip((c for _, c in longer.sequences), probe.sequences, strict=True)
    )

    # The key: each input alone changes it.
    tokenizer, template = module.tokenizer, module.rendering.chat_template
    prompts, digest = load_probes()
    model = model_identity(OmegaConf.create(TINY_MODEL))
    key = probe_key(model, tokenizer, template, digest, 16)
    assert key == probe_key(model, tokenizer, template, digest, 16)
    other_model = model_identity(OmegaConf.create({**TINY_MODEL, "dtype": "bfloat16"}))
    assert probe_key(other_model, tokenizer, template, digest, 16) != key
    assert probe_key(model, tokenizer, template, digest, 17) != key
    assert probe_key(model, tokenizer, template + " ", digest, 16) != key
    edited = tmp_path / "probes.json"
    edited.write_text(json.dumps({"prompts": [*prompts, "One more prompt."]}))
    assert probe_key(model, tokenizer, template, load_probes(edited)[1], 16) != key
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<retention-test-token>"])
    assert probe_key(model, grown, template, digest, 16) != key


def test_the_committed_probe_set_is_bilingual_and_general():
    prompts, _ = load_probes()
    data = json.loads(Path("lit_lora/samples/retention_probes.json").read_text())["prompts"]
    assert len(prompts) >= 24 and {p["lang"] for p in data} == {"en", "vi"}
    assert len({p["domain"] for p in data}) >= 8
    with pytest.raises(UserError, match="not a readable probe file"):
        load_probes("/nonexistent/probes.json")


class _Scripted(BoringModel):
    """Validation logs hand-made figures: epoch 0 learns the task best but drifts; epoch 1 drifts little."""

    FIGURES = ({"val/loss": 1.00, "retention/kl": 0.60}, {"val/loss": 1.10, "retention/kl": 0.05})

    def on_validation_epoch_end(self):
        for name, value in self.FIGURES[self.current_epoch].items():
            self.log(name, value)


@pytest.mark.parametrize(
    ("monitor", "kept_epoch"), [("val/loss", 0), ("val/loss + 1.0 * retention/kl", 1), ("retention/kl", 1)]
)
def test_checkpoint_choice_by_a_retention_criterion(tmp_path, monitor, kept_epoch):
    checkpoint = AdapterCheckpoint(
        dirpath=str(tmp_path), monitor=monitor, mode="min", save_top_k=1, save_last=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Scripted())
    assert len(list(tmp_path.glob("*.ckpt"))) == 1
    # Two training batches per epoch: epoch e's checkpoint is named after step 2 (e + 1).
    assert Path(checkpoint.best_model_path).name == f"step-{2 * (kept_epoch + 1):06d}.ckpt"
    figures = _Scripted.FIGURES[kept_epoch]
    expected = sum(w * figures[name] for w, name in parse_criterion(monitor) or [(1.0, monitor)])
    assert float(checkpoint.best_model_score) == pytest.approx(expected)


def test_a_malformed_criterion_is_refused():
    with pytest.raises(UserError, match="not a metric or number"):
        AdapterCheckpoint(monitor="val/loss + two * retention/kl")


def test_each_rank_restores_its_own_rng_states_and_other_layouts_say_why_not():
    from lit_lora.callbacks.adapter_checkpoint import rank_rng_states

    own, per_rank = {"torch": "rank 0"}, [{"torch": "rank 0"}, {"torch": "rank 1"}]
    assert rank_rng_states(own, per_rank, 1, 2) == ({"torch": "rank 1"}, None)
    assert rank_rng_states(own, per_rank[:1], 0, 1) == ({"torch": "rank 0"}, None)
    assert rank_rng_states(own, None, 0, 1) == (own, None)  # an older one-process checkpoint
    states, note = rank_rng_states(own, None, 1, 2)  # an older multi-process one: rank 0's only
    assert states == own and "older lit-lora" in note
    states, note = rank_rng_states(own, per_rank, 0, 1)  # written by 2 processes, resumed by 1
    assert states == own and "written by 2 process(es), this run has 1" in note
    assert rank_rng_states(None, None, 0, 2)[0] is None
