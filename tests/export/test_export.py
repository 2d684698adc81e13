"""GGUF export (issue 22): files read back by readers lit-lora did not write (transformers' GGUF loader,
gguf's reader), the parity gate, the Modelfile, and bad input.

The tiny random-init models share the embedded SmolLM2 tokenizer, so every file here carries the real
49,152-token vocabulary. llama.cpp itself runs only where llama-cpp-python is installed (``make
llamacpp``; ``tests/export/test_export.py -m llamacpp``)."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_lora.config.apps import MergeConfig
from lit_lora.config.schema import ModelConfig, QuantConfig, to_train_config
from lit_lora.data.demo import make_rows
from lit_lora.data.rendering import NAMED_TEMPLATES, Rendering, prompt_text
from lit_lora.errors import UserError
from lit_lora.export import exporter as export_command
from lit_lora.export import gates, gguf_files, llama_cpp_runtime
from lit_lora.export.modelfile import UntranslatableTemplate, modelfile_text, translate
from lit_lora.inference.scoring import greedy_answer_tokens
from lit_lora.models.embedded import gguf_path, resolve
from lit_lora.models.merging import merged_model
from lit_lora.training.run import train
from tests.helpers import ROOT, TINY, compose_train

SMALL = ["data.test_size=6", "data.score_max_new_tokens=6"]
# The tiny model's config with the two keys GPT-2's config has no name for (the others map onto n_embd,
# n_layer, n_head, n_positions). 1024 positions: transformers' GGUF reader sizes GPT-2's position table
# with its default n_positions (GPT-2's own 1024), whatever the file's context length says.
GPT2 = [
    "model.name_or_path=tiny-random-gpt2",
    "model.model_type=gpt2",
    "model.config_overrides.max_position_embeddings=1024",
    "~model.config_overrides.intermediate_size",
    "~model.config_overrides.num_key_value_heads",
]
QWEN2 = ["model.name_or_path=tiny-random-qwen2", "model.model_type=qwen2"]
# Qwen3: per-head q/k norms, and heads of 128 dimensions (its config's default, as in every Qwen3) that
# are not hidden / heads: the file must say so (attention.key_length).
QWEN3 = ["model.name_or_path=tiny-random-qwen3", "model.model_type=qwen3"]
# Llama 3.1's RoPE scaling, with an original context of 64 tokens, so that the gate's long row (96
# tokens) lies beyond it; 0.2 initialisation so that attention, and with it the rotation, moves logits.
LLAMA31 = [
    "model.name_or_path=tiny-random-llama31",
    "+model.config_overrides.initializer_range=0.2",
    "+model.config_overrides.rope_parameters={rope_type:llama3,factor:8.0,low_freq_factor:1.0,"
    "high_freq_factor:4.0,original_max_position_embeddings:64,rope_theta:10000.0}",
]
VOCAB = 512
SPM_VOCAB = 600


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> list[str]:
    """Model overrides: the tiny model with a 512-token byte-level BPE trained here on the demo's texts
    (SmolLM2's special tokens and chat template). Every reader of a GGUF file parses the whole vocabulary
    (seconds for SmolLM2's 49,152 tokens and merges, each time); the embedded vocabulary is checked in
    test_embedded_model_export_has_the_metadata_and_tokenizer_of_the_shipped_gguf."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in make_rows(300, 0, False)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=specials[1],
        eos_token=specials[2],
        unk_token=specials[0],
        pad_token=specials[2],
    )
    tokenizer.chat_template = AutoTokenizer.from_pretrained(
        str(resolve("embedded:smollm2-135m"))
    ).chat_template
    folder = tmp_path_factory.mktemp("vocab") / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    assert len(tokenizer) == VOCAB
    return ["model=tiny", f"model.tokenizer={folder}", f"model.config_overrides.vocab_size={VOCAB}"]


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory) -> list[str]:
    """Model overrides: the tiny model with a SentencePiece-style vocabulary (pieces marked with "▁", BPE
    with byte fallback to <0x00>..<0xFF>: the tokenizer.json shape of Llama 2, Mistral, Gemma and Phi-3),
    600 tokens trained here on the demo's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in make_rows(300, 0, False)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=SPM_VOCAB - 256, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # As in Llama 2 / Mistral: the 256 byte tokens are ordinary pieces at ids 3..258, not added tokens.
    trained = json.loads(bpe.to_str())["model"]
    pieces = [*specials, *(f"<0x{i:02X}>" for i in range(256))]
    pieces += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    model = models.BPE(
        vocab={t: i for i, t in enumerate(pieces)},
        merges=merges,
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    decoder, bpe = bpe.decoder, Tokenizer(model)
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.decoder = decoder
    bpe.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    # Mistral's template shape: [INST] ... [/INST], no tokens of its own
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    folder = tmp_path_factory.mktemp("spm") / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    return ["model=tiny", f"model.tokenizer={folder}", f"model.config_overrides.vocab_size={SPM_VOCAB}"]


def test_a_sentencepiece_style_vocabulary_exports_and_reads_back_with_the_same_ids(
    tmp_path_factory, spm_vocab, tmp_path
):
    """Byte-fallback BPE vocabularies are written as llama.cpp's ``llama`` tokenizer model (pieces, scores
    from the merge order, byte tokens): transformers' GGUF reader encodes the held-out rows to the same ids
    and the logits are the trained ones."""
    run = _trained(tmp_path_factory, "spm", spm_vocab, "data.template=auto")
    out = tmp_path / "out"
    report = export_command.run(
        [*spm_vocab, f"adapter={run / 'adapter'}", "outtype=f32", "modelfile=false", f"output_dir={out}"]
    )
    gate = report["gate"]
    assert gate["passed"] and gate["tokenizer_same_ids"] == "6/6" and gate["max_abs_logit_diff"] <= 1e-4, gate
    fields = gguf_files.read_fields(out / report["file"])
    # Metaspace with prepend_scheme "first": no "▁" after the template's leading special token
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    types = fields["tokenizer.ggml.token_type"]
    assert types[3 + 0x41] == int(gguf.TokenType.BYTE) and types[0] == int(gguf.TokenType.UNKNOWN)
    cpp = gate["llama_cpp"]
    if cpp["ran"]:  # llama.cpp tokenizes the rendered prompts itself from the file: the same answers
        assert cpp["answers_same_pct"] == 100.0, cpp


def _trained(tmp_path_factory, name: str, model: list[str], *overrides: str):
    run = tmp_path_factory.mktemp(name) / "run"
    result = train(compose_train([*TINY, *model, *SMALL, "score=false", *overrides, f"output_dir={run}"]))
    assert result.summary["status"] == "completed"
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), "trained: B is not zero"
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_vocab):
    return _trained(tmp_path_factory, "tiny", small_vocab)


@pytest.fixture(scope="module")
def models(small_vocab) -> list[str]:
    """What the commands after training need: the run's model and llama.cpp's name of its pre-tokenizer."""
    return [*small_vocab, "pre_tokenizer=gpt-2"]


def test_f32_export_reads_back_exactly_and_passes_the_gate(tiny_run, models):
    report = export_command.run([*models, f"adapter={tiny_run / 'adapter'}", "outtype=f32"])
    out = tiny_run / "export-gguf-f32"
    assert report == json.loads((out / "export.json").read_text())
    gate = report["gate"]
    # transformers' loader undoes llama.cpp's rotary row order: equal logits prove the layout.
    assert gate["passed"] and gate["max_abs_logit_diff"] <= 1e-4, gate
    assert gate["tokenizer_same_ids"] == "6/6" and gate["answers_same_pct"] == 100.0
    assert gate["reference"] == "base + adapter merged in float32" and gate["decided_differences"] == 0
    assert report["tensor_types"] == {"F32": 20} and not report["fallback_f16"]
    fields = gguf_files.read_fields(out / "model-f32.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0
    assert fields["tokenizer.chat_template"] == Rendering.load(tiny_run / "adapter").chat_template
    assert (out / "Modelfile").read_text().startswith("FROM ./model-f32.gguf\n")
    # The adapter moved the weights: the export is not the base.
    with_adapter = gguf.GGUFReader(str(out / "model-f32.gguf"))
    q = next(t for t in with_adapter.tensors if t.name == "blk.0.attn_q.weight")
    base = merged_model(MergeConfig(model=_model(models), adapter=str(tiny_run / "adapter"), output_dir="x"))
    w = base.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(np.asarray(q.data), gguf_files.reorder_rotary_rows(w, 4))


def test_quantized_export_keeps_norms_f32_and_a_failed_gate_renames_the_file(tiny_run, models, monkeypatch):
    monkeypatch.setitem(gates.LOGIT_BOUNDS, "q8_0", 0.0)  # q8_0 cannot be exact: the gate fails
    with pytest.raises(export_command.GateFailed, match="max \\|logit difference\\|"):
        export_command.run([*models, f"adapter={tiny_run / 'adapter'}", "outtype=q8_0"])
    out = tiny_run / "export-gguf-q8_0"
    report = json.loads((out / "export.json").read_text())
    assert not report["gate"]["passed"] and report["file"] == "model-q8_0.GATE-FAILED.gguf"
    assert not (out / "model-q8_0.gguf").exists()
    assert report["tensor_types"] == {"Q8_0": 15, "F32": 5}  # 14 projections + embeddings; 5 norms
    # The figures are real: transformers reads the quantized file and its logits are close, not equal.
    assert 0 < report["gate"]["max_abs_logit_diff"] < 1.0
    reader = gguf.GGUFReader(str(out / report["file"]))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_down.weight"] == "Q8_0"


def test_an_export_with_q_and_k_rows_in_the_wrong_order_fails_the_gate(
    tmp_path_factory, small_vocab, models, monkeypatch, tmp_path
):
    """A deliberately broken f16 export (the rotary reordering of q/k left out, so llama.cpp and
    transformers' reader rotate the wrong pairs of dimensions) fails on its logits. The tiny model is
    initialised 25x wider than usual: with the default 0.02 its attention is nearly uniform, and which
    dimensions rotate together hardly moves a logit."""
    wide = ["+model.config_overrides.initializer_range=0.5"]
    run = _trained(tmp_path_factory, "wide", [*small_vocab, *wide])
    monkeypatch.setattr(gguf_files, "reorder_rotary_rows", lambda weight, heads: weight)
    out = tmp_path / "broken"
    overrides = [*models, *wide, f"adapter={run / 'adapter'}", "outtype=f16", f"output_dir={out}"]
    with pytest.raises(export_command.GateFailed, match=r"max \|logit difference\|"):
        export_command.run([*overrides, "modelfile=false"])
    gate = json.loads((out / "export.json").read_text())["gate"]
    assert gate["max_abs_logit_diff"] > 10 * gates.LOGIT_BOUNDS["f16"], gate


def test_a_differing_answer_fails_only_where_the_reference_was_not_nearly_tied(tiny_run, models):
    """The answer check's margin: an "export" that takes the reference's second-best token at one step
    differs by exactly the reference's top-1 / top-2 margin there, computed here independently; it is a
    decided difference above the bound and a near-tie below it."""
    merged = merged_model(
        MergeConfig(model=_model(models), adapter=str(tiny_run / "adapter"), output_dir="x")
    )
    model, tokenizer = merged.model.eval(), merged.tokenizer
    prompts = [tokenizer("Translate to French: good morning")["input_ids"], tokenizer("2 + 2 =")["input_ids"]]
    expected = greedy_answer_tokens(model, prompts, 6, 2, tokenizer.pad_token_id, None, "reference")
    assert gates.divergences(model, tokenizer, prompts, expected, expected) == []
    k = 3
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[1] + expected[1][:k]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert int(top.indices[0]) == expected[1][k]
    got = [expected[0], [*expected[1][:k], int(top.indices[1])]]
    [found] = gates.divergences(model, tokenizer, prompts, expected, got)
    margin = float(top.values[0] - top.values[1])
    assert (found.row, found.position) == (1, k) and found.margin == pytest.approx(margin, abs=1e-4)
    assert found.decided(margin / 2) and not found.decided(margin * 2)


def test_lora_gguf_holds_peft_a_and_b_in_llama_cpp_order(tiny_run, models):
    report = export_command.run(
        [*models, f"adapter={tiny_run / 'adapter'}", "format=gguf-lora", "outtype=f32"]
    )
    assert report["gate"]["passed"] and report["gate"]["max_rel_update_diff"] <= 1e-6
    file = tiny_run / "export-gguf-lora-f32" / "adapter-f32.gguf"
    arrays, alpha = gguf_files.read_lora_gguf(file)
    config = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    assert alpha == config["lora_alpha"]
    fields = gguf_files.read_fields(file)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    peft = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn"
    assert np.array_equal(
        arrays["blk.1.attn_v.weight.lora_a"], peft[f"{prefix}.v_proj.lora_A.weight"].numpy()
    )
    b_q = peft[f"{prefix}.q_proj.lora_B.weight"].numpy()
    assert np.array_equal(arrays["blk.1.attn_q.weight.lora_b"], gguf_files.reorder_rotary_rows(b_q, 4))
    b_k = peft[f"{prefix}.k_proj.lora_B.weight"].numpy()  # 2 key/value heads
    assert np.array_equal(arrays["blk.1.attn_k.weight.lora_b"], gguf_files.reorder_rotary_rows(b_k, 2))
    assert "FROM needs" in report["modelfile"]["note"]


def test_rotary_row_order_is_the_one_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    undo = LlamaTensorProcessor({"num_attention_heads": 6, "num_key_value_heads": 2})
    assert np.array_equal(
        undo.process(gguf_files.reorder_rotary_rows(w, 6), "blk.0.attn_q.weight").weights, w
    )
    k = w[:16]
    assert np.array_equal(
        undo.process(gguf_files.reorder_rotary_rows(k, 2), "blk.0.attn_k.weight").weights, k
    )


# Gemma 2 and 3: norms stored as offsets from 1, heads of 256 (their configs' default); Gemma 2 with
# soft-capping; 0.2 initialisation so that attention matters. Phi-3: fused qkv and gate/up projections.
GEMMA2 = [
    "model.name_or_path=tiny-random-gemma2",
    "model.model_type=gemma2",
    "+model.config_overrides.initializer_range=0.2",
    "model.attn_implementation=eager",  # transformers' Gemma 2 soft-caps attention in eager only
]
GEMMA3 = [
    "model.name_or_path=tiny-random-gemma3",
    "model.model_type=gemma3_text",
    "+model.config_overrides.initializer_range=0.2",
]
# (Not named "phi3": llama.cpp picks Phi-3's SentencePiece token attributes by a model name containing
# "phi3" or "phi-3", and this tiny model has a byte-level BPE vocabulary without "</s>".)
PHI3 = ["model.name_or_path=tiny-random-phi", "model.model_type=phi3"]
MISTRAL = ["model.name_or_path=tiny-random-mistral", "model.model_type=mistral"]
FAMILIES = {
    "gpt2": GPT2,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "llama31": LLAMA31,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "phi3": PHI3,
    "mistral": MISTRAL,
}


_FAMILY_RUNS: dict = {}


def _family_run(tmp_path_factory, small_vocab, family: str):
    """The tiny model of ``family`` trained once per module (the transformers and llama.cpp tests share it)."""
    if family not in _FAMILY_RUNS:
        arch = [*small_vocab, *FAMILIES[family]]
        _FAMILY_RUNS[family] = _trained(tmp_path_factory, family, arch, *TRAIN_ONLY.get(family, ()))
    return _FAMILY_RUNS[family]


@pytest.fixture(scope="module")
def llama31_run(tmp_path_factory, small_vocab):
    return _family_run(tmp_path_factory, small_vocab, "llama31")


# Phi-3's MLP too: its fused gate/up projection is the one llama.cpp reads as a double-width ffn_up.
TRAIN_ONLY = {"phi3": ["lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_exports_and_reads_back_with_the_trained_logits(
    tmp_path_factory, small_vocab, models, family
):
    arch = FAMILIES[family]
    run = _family_run(tmp_path_factory, small_vocab, family)
    out = run.parent / "export"
    overrides = [*models, *arch, f"adapter={run / 'adapter'}", "outtype=f32", "modelfile=false"]
    report = export_command.run([*overrides, f"output_dir={out}"])
    gate = report["gate"]
    assert gate["max_abs_logit_diff"] <= 1e-4 and gate["passed"], gate
    if family == "llama31":
        # the table llama.cpp rotates by, from transformers' own Llama 3 frequencies; the gate read a
        # row longer than the original context with it
        fields = {t.name: t for t in gguf.GGUFReader(str(out / report["file"])).tensors}
        factors = np.asarray(fields["rope_freqs.weight"].data)
        assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0), factors
        assert gate["long_row_tokens"] == 96 and gate["rope_freqs"].startswith("applied to")


def test_an_export_without_the_rope_scaling_table_fails_the_gate(llama31_run, models, monkeypatch, tmp_path):
    """Llama 3.1's export with its ``rope_freqs`` left out: short prompts hardly notice, the gate's row
    beyond the original RoPE context does."""
    monkeypatch.setattr(gguf_files, "rope_freq_factors", lambda config: None)
    out = tmp_path / "no-rope-freqs"
    overrides = [*models, *LLAMA31, f"adapter={llama31_run / 'adapter'}", "outtype=f32", "modelfile=false"]
    with pytest.raises(export_command.GateFailed, match=r"max \|logit difference\|"):
        export_command.run([*overrides, f"output_dir={out}"])
    gate = json.loads((out / "export.json").read_text())["gate"]
    assert gate["rope_freqs"] is None and gate["long_row_tokens"] == 96, gate


def test_export_of_a_qlora_run_merges_into_the_dequantized_base(tmp_path_factory, small_vocab, models):
    run = _trained(tmp_path_factory, "nf4", small_vocab, "quant=nf4", "quant.compute_dtype=float32")
    overrides = [*models, "quant=nf4", "quant.compute_dtype=float32"]
    report = export_command.run([*overrides, f"adapter={run / 'adapter'}", "outtype=f32", "modelfile=false"])
    assert report["quant"] == "nf4" and report["gate"]["max_abs_logit_diff"] <= 1e-4
    merge = {"model": _model(models), "adapter": str(run / "adapter"), "output_dir": "x"}
    dequantized = merged_model(MergeConfig(**merge, quant=QuantConfig(method="nf4", compute_dtype="float32")))
    plain = merged_model(MergeConfig(**merge))
    exported = AutoModelForCausalLM.from_pretrained(
        str(run / "export-gguf-f32"), gguf_file="model-f32.gguf", dtype=torch.float32
    )
    ours = exported.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ours, dequantized.model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(ours, plain.model.model.layers[0].mlp.up_proj.weight)


def test_embedded_model_export_has_the_metadata_and_tokenizer_of_the_shipped_gguf(tmp_path):
    """The untrained embedded model (an adapter with B = 0) exported as f16: every key of the shipped
    Q4_1 file is there, the tokenizer arrays are equal, so llama.cpp sees the same tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(str(resolve("embedded:smollm2-135m")), dtype=torch.float32)
    untrained = get_peft_model(base, LoraConfig(r=1, target_modules=["q_proj"]))
    untrained.save_pretrained(str(tmp_path / "adapter"))
    report = export_command.run(
        [f"adapter={tmp_path / 'adapter'}", f"output_dir={tmp_path / 'out'}", "gate=false", "modelfile=false"]
    )
    ours = gguf_files.read_fields(tmp_path / "out" / report["file"])
    shipped = gguf_files.read_fields(gguf_path("smollm2-135m"))
    assert set(shipped) - set(ours) == set(), "every key of the shipped file"
    for key in shipped:
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            assert ours[key] == shipped[key], key
        if key.startswith("llama."):
            assert ours[key] == pytest.approx(shipped[key]), key
    assert (
        ours["general.file_type"] == 1
        and ours["tokenizer.chat_template"] == shipped["tokenizer.chat_template"]
    )


EXPECTED_MODELFILE = '''FROM ./model-f16.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
'''


def test_modelfile_of_the_embedded_chat_template(tokenizer):
    rendering = Rendering.resolve(tokenizer, "auto")
    translation = translate(lambda m: prompt_text(tokenizer, rendering, m), rendering.system_prompt)
    assert modelfile_text("./model-f16.gguf", translation) == EXPECTED_MODELFILE
    # A system prompt of the run's own replaces the template's default.
    own = Rendering.resolve(tokenizer, "auto", system_prompt="Answer in JSON.")
    assert translate(lambda m: prompt_text(tokenizer, own, m), own.system_prompt).system == "Answer in JSON."
    alpaca = Rendering(template="alpaca", chat_template=NAMED_TEMPLATES["alpaca"])
    with pytest.raises(UntranslatableTemplate, match="modelfile=false"):
        translate(lambda m: prompt_text(tokenizer, alpaca, m), None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["outtype=q2_k"], "outtype='q2_k' is not one of"),
        (["format=gguf-lora", "outtype=q4_0"], "format=gguf-lora"),
        (["format=onnx"], "format"),
        (
            ["model.model_type=falcon"],
            "does not support model_type 'falcon'; supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
            "phi3, gpt2",
        ),
        (["output_dir=/elsewhere"], "outside the output root"),
    ],
)
def test_bad_export_requests_fail_before_work_starts(tiny_run, models, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        export_command.run([*models, f"adapter={tiny_run / 'adapter'}", *overrides])


def test_existing_output_is_never_overwritten_and_a_bad_folder_is_one_line(tiny_run, models, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="never overwrites"):
        export_command.run([*models, f"adapter={tiny_run / 'adapter'}", f"output_dir={out}"])
    assert (out / "mine.txt").read_text() == "keep" and len(list(tmp_path.iterdir())) == 1
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="does not fit this base model"):  # the embedded base: 576 wide
        export_command.run([f"adapter={tiny_run / 'adapter'}", f"output_dir={fresh}"])
    assert not fresh.exists() and len(list(tmp_path.iterdir())) == 1, "nothing half-written"
    done = subprocess.run(
        [sys.executable, "-m", "lit_lora.export", "model=tiny", f"adapter={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "is not a PEFT adapter folder" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_a_dora_adapter_is_refused_as_a_llama_cpp_lora():
    with pytest.raises(UserError, match="DoRA"):
        gguf_files.lora_pairs({}, {"use_dora": True}, None)


@pytest.mark.llamacpp
@pytest.mark.skipif(
    not llama_cpp_runtime.available(), reason="llama-cpp-python is not installed (make llamacpp)"
)
def test_llama_cpp_answers_from_the_export_and_from_the_shipped_base_with_the_lora(
    tiny_run, models, tokenizer, tmp_path
):
    """llama.cpp runs the merged export (tiny model), and the shipped Q4_1 base + a LoRA GGUF of an
    embedded-model adapter (random, small, non-zero B): both answer like lit_lora.apps.generate."""
    report = export_command.run(
        [*models, f"adapter={tiny_run / 'adapter'}", "outtype=f32", f"output_dir={tmp_path / 'a'}"]
    )
    cpp = report["gate"]["llama_cpp"]
    assert cpp["ran"] and cpp["rows"] == 6 and cpp["answers_same_pct"] >= 50, cpp

    base = AutoModelForCausalLM.from_pretrained(str(resolve("embedded:smollm2-135m")), dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # large enough to move the logits well beyond 4-bit noise
    adapter.save_pretrained(str(tmp_path / "embedded"))
    short = ["gate_rows=5", "data.score_max_new_tokens=4", "data.test_size=5"]
    report = export_command.run(
        [f"adapter={tmp_path / 'embedded'}", "format=gguf-lora", f"output_dir={tmp_path / 'b'}", *short]
    )
    cpp = report["gate"]["llama_cpp"]
    assert report["gate"]["passed"] and cpp["ran"] and cpp["model"] == str(gguf_path("smollm2-135m")), cpp

    # llama.cpp applies the adapter as PEFT does: its next-token logits on the shipped Q4_1 base move
    # towards the PEFT model's, away from the plain base's.
    from llama_cpp import Llama

    rendering = Rendering.resolve(tokenizer, "auto")
    row = make_rows(1, 1, True)[0]
    text = prompt_text(
        tokenizer, rendering, [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        peft_logits = adapter(input_ids=ids).logits[0, -1].numpy()
        with adapter.disable_adapter():
            base_logits = adapter(input_ids=ids).logits[0, -1].numpy()

    def llama_cpp_logits(lora) -> np.ndarray:
        model = str(gguf_path("smollm2-135m"))
        llm = Llama(model_path=model, lora_path=lora, n_ctx=512, logits_all=True, verbose=False)
        llm.eval(llm.tokenize(text.encode(), add_bos=True, special=True))
        return np.array(llm.scores[llm.n_tokens - 1], copy=True)  # the buffer goes with llm

    with_lora = llama_cpp_logits(str(tmp_path / "b" / "adapter-f16.gguf"))
    without = llama_cpp_logits(None)
    gap = {
        "llama.cpp + LoRA vs PEFT": float(np.abs(with_lora - peft_logits).mean()),
        "llama.cpp base vs PEFT": float(np.abs(without - peft_logits).mean()),
        "llama.cpp base vs torch base": float(np.abs(without - base_logits).mean()),
    }
    print(gap)
    assert gap["llama.cpp + LoRA vs PEFT"] < 0.5 * gap["llama.cpp base vs PEFT"], gap


def _model(models: list[str]) -> ModelConfig:
    """The typed model config of ``models`` (overrides for the commands after training)."""
    train_keys = [o for o in models if o.lstrip("+").startswith("model")]
    return to_train_config(compose_train([*TINY, *train_keys, "output_dir=x"])).model


@pytest.mark.llamacpp
@pytest.mark.skipif(
    not llama_cpp_runtime.available(), reason="llama-cpp-python is not installed (make llamacpp)"
)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_llama_cpp_runs_each_family_merged_and_as_a_lora_with_the_trained_logits(
    tmp_path_factory, small_vocab, models, family, tmp_path
):
    """llama.cpp itself (not a reader lit-lora chose) on each family's tiny model: the merged f16 export,
    and the untrained base exported as GGUF with the f16 LoRA GGUF applied, give logits within the f16
    bound of transformers' float32 base + adapter, on three prompts, one longer than Llama 3.1's original
    RoPE context."""
    from llama_cpp import Llama

    arch = FAMILIES[family]
    run = _family_run(tmp_path_factory, small_vocab, family)
    adapter = run / "adapter"
    common = [*models, *arch, "outtype=f16", "modelfile=false", "gate=false"]
    merged_file = (
        tmp_path
        / "merged"
        / export_command.run([*common, f"adapter={adapter}", f"output_dir={tmp_path / 'merged'}"])["file"]
    )
    # The base as GGUF: the export of the same adapter with every B set to zero.
    zero = tmp_path / "zero"
    zero.mkdir()
    for name in ("adapter_config.json", "rendering.json"):
        if (adapter / name).exists():
            (zero / name).write_bytes((adapter / name).read_bytes())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {k: torch.zeros_like(t) if "lora_B" in k else t for k, t in tensors.items()},
        str(zero / "adapter_model.safetensors"),
    )
    base_file = (
        tmp_path
        / "base"
        / export_command.run([*common, f"adapter={zero}", f"output_dir={tmp_path / 'base'}"])["file"]
    )
    lora = export_command.run(
        [
            *common,
            "format=gguf-lora",
            f"adapter={adapter}",
            f"base_gguf={base_file}",
            f"output_dir={tmp_path / 'lora'}",
        ]
    )
    lora_file = tmp_path / "lora" / lora["file"]

    reference = merged_model(
        MergeConfig(model=_model([*models, *arch]), adapter=str(adapter), output_dir="x")
    )
    tokenizer = reference.tokenizer
    short = [tokenizer("Translate to French: good morning")["input_ids"], tokenizer("2 + 2 =")["input_ids"]]
    text = " ".join(f"{r['instruction']} {r['input']}" for r in make_rows(8, 0, False))
    prompts = [*short, tokenizer(text)["input_ids"][:120]]
    assert len(prompts[2]) == 120
    bound = gates.LOGIT_BOUNDS["f16"]
    for label, model_file, lora_path in [("merged", merged_file, None), ("lora", base_file, lora_file)]:
        llm = Llama(
            model_path=str(model_file),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=256,
            logits_all=True,
            verbose=False,
        )
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)], copy=True)
            with torch.no_grad():
                ours = reference.model(input_ids=torch.tensor([ids])).logits[0].numpy()
            diff = float(np.abs(theirs - ours).max())
            print(f"{family} {label} {len(ids)} tokens: max |logit diff| {diff:.4f}")
            assert diff <= bound, f"{family} {label}: {diff:.4f} > {bound} on {len(ids)} tokens"
        llm.close()
