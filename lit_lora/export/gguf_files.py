"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package's writer.

Two kinds (:mod:`lit_lora.export.exporter` decides which, and checks them):

- :func:`write_model_gguf`: a merged Hugging Face model as one GGUF model file: hyper-parameters, every
  tensor under the name gguf's own tables give it (``gguf.get_tensor_name_map``), the tokenizer
  (vocabulary, merges, token types, special ids) and training's chat template.
- :func:`write_lora_gguf`: a PEFT LoRA adapter as a llama.cpp LoRA adapter file (``--lora``), to apply on
  a GGUF base without merging.

Layout facts the files must follow so that llama.cpp (and transformers' GGUF reader, which undoes them)
read the weights as trained:

- llama.cpp's ``llama`` architecture (Llama, Mistral, SmolLM2) applies rotary embeddings to adjacent
  pairs of each head's dimensions, while Hugging Face's checkpoints rotate the two halves of each head;
  the rows of ``q_proj`` and ``k_proj`` are therefore reordered per head (first half and second half
  interleaved). Qwen2's GGUF architecture uses the halves convention: no reordering.
- GPT-2's Hugging Face checkpoints store their linear layers as ``Conv1D`` (input, output) matrices;
  GGUF stores (output, input), so they are transposed. Its output head is written even when tied.
- 1-D tensors (norms, biases) stay float32 in every output type, as llama.cpp's own converter keeps them;
  a matrix whose rows do not fill whole quantization blocks is written as float16 instead (reported).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lit_lora.errors import UserError

# outtype -> (tensor type of the matrices, file type recorded in general.file_type)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# What llama.cpp's LoRA loader takes for adapter tensors.
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` is written: the GGUF architecture and its layout rules."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    reorder_qk: bool = False  # rotary pairs: see the module docstring
    transposed: tuple[str, ...] = ()  # Conv1D modules (path suffixes) stored (input, output)
    write_tied_output: bool = False
    norm: str = "rms"  # "rms" or "layer" (with a bias)
    # Gemma multiplies by (1 + w) in its RMS norms; llama.cpp by w: the file stores 1 + w.
    norm_offset: float = 0.0
    sliding_window: bool = False  # attention.sliding_window from the config
    softcapping: bool = False  # Gemma 2: attention and final logit soft-capping


ARCHITECTURES = {
    "llama": Architecture("LLAMA", reorder_qk=True),
    "mistral": Architecture("LLAMA", reorder_qk=True),
    "qwen2": Architecture("QWEN2"),  # Qwen2 and Qwen2.5
    "qwen3": Architecture("QWEN3"),  # + per-head RMS norms of q and k (attn_q_norm / attn_k_norm)
    "gemma2": Architecture("GEMMA2", norm_offset=1.0, sliding_window=True, softcapping=True),
    "gemma3_text": Architecture("GEMMA3", norm_offset=1.0, sliding_window=True),
    # Phi-3 keeps its fused projections: llama.cpp's phi3 reads attn_qkv and a double-width ffn_up.
    "phi3": Architecture("PHI3", sliding_window=True),
    "gpt2": Architecture(
        "GPT2",
        transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        write_tied_output=True,
        norm="layer",
    ),
}
# Buffers of Hugging Face models that are not weights (recomputed by every runtime).
# (Dotted: GPT-2's ``attn.c_attn.bias`` is a weight, its ``attn.bias`` causal mask is not.)
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies it knows, by model type, where that
# alone decides it. The embedded model's comes from its own GGUF file; other cases need
# ``pre_tokenizer=`` (llama.cpp's name for it).
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}
LLAMA3_VOCAB = 128256  # Llama 3's vocabulary: llama.cpp's "llama-bpe" pre-tokenizer


def architecture(model_type: str) -> Architecture:
    """The export rules of ``model_type``; a :class:`UserError` naming the supported ones otherwise."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def check_outtype(outtype: str, lora: bool) -> None:
    """Refuse an output type this export cannot write (or llama.cpp's LoRA loader cannot take)."""
    allowed = LORA_OUTTYPES if lora else tuple(OUTTYPES)
    if outtype not in allowed:
        kind = "gguf-lora" if lora else "gguf"
        raise UserError(f"outtype={outtype!r} is not one of {', '.join(allowed)} (format={kind})")


def rope_parameters(config, layers: str = "full_attention") -> dict:
    """The model's RoPE parameters (transformers 5's ``rope_parameters``, or the older ``rope_scaling``);
    for models whose layer types rotate differently (Gemma 3: ``{"full_attention": ..., "sliding_attention":
    ...}``), those of ``layers``."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope) if isinstance(rope, dict) else {}
    return dict(rope.get(layers) or {}) if "full_attention" in rope else rope


def rope_type(config) -> str:
    rope = rope_parameters(config)
    return str(rope.get("rope_type", rope.get("type")) or "default")


# RoPE scalings the writer puts in the file: ``llama3`` as llama.cpp's per-dimension ``rope_freqs``
# tensor (what its own converter writes), ``linear`` as llama.cpp's scaling type and factor.
ROPE_TYPES = ("default", "llama3", "linear")


def check_config(config) -> None:
    """Refuse what the writer would get wrong before any weight loads: an unsupported architecture, or a
    RoPE scaling it does not write."""
    architecture(config.model_type)
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        raise UserError(
            f"GGUF export does not write RoPE scaling of type {kind!r} yet (it writes: {', '.join(ROPE_TYPES)})"
        )
    if kind == "llama3" and config.model_type not in ("llama", "mistral"):
        raise UserError(
            f"RoPE scaling 'llama3' is written for Llama-family models, not {config.model_type!r}"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_freq_factors(config) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for a model with ``llama3`` RoPE scaling: per rotary frequency, the
    factor its base frequency is divided by (llama.cpp rotates by ``theta_i / rope_freqs[i]``). Computed
    from transformers' own initialisation of the scaled frequencies, so the file rotates exactly as the
    trained model does; None for other models."""
    if rope_type(config) != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default_inv_freq(config) / scaled.double()).numpy().astype(np.float32)


def default_inv_freq(config) -> torch.Tensor:
    """The unscaled rotary frequencies ``theta ** (-2i / d)`` of ``config`` (float64)."""
    d = head_dim(config)
    theta = float(rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


# ------------------------------------------------------------------------------------------ tensors
def reorder_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection (or LoRA B) in llama.cpp's rotary order: per head, the rows of the first
    half and of the second half interleaved (row ``i`` and row ``i + d/2`` become neighbours)."""
    d = weight.shape[0] // heads
    w = weight.reshape(heads, 2, d // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _heads_of(name: str, config) -> int | None:
    if name.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if name.endswith("self_attn.k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_tensor_name(hf_name: str, name_map) -> str:
    """``blk.N.attn_q.weight`` for ``model.layers.N.self_attn.q_proj.weight``, from gguf's tables."""
    module, _, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(module)
    if mapped is None:
        raise UserError(f"no GGUF tensor name for {hf_name!r} in gguf's tables")
    return f"{mapped}.{suffix}"


def _encode(array: np.ndarray, tensor_type: str) -> tuple[np.ndarray, object]:
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: float32 / float16 as they are, the others
    through ``gguf.quants.quantize`` (bytes, with the quantization type)."""
    import gguf

    if tensor_type == "F32":
        return array.astype(np.float32), None
    if tensor_type == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[tensor_type]
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def tensor_type_for(array: np.ndarray, wanted: str) -> str:
    """The type a tensor is written in: float32 for 1-D tensors, ``wanted`` for matrices whose rows fill
    whole blocks of it, float16 for the others."""
    import gguf

    if array.ndim < 2:
        return "F32"
    if wanted in ("F32", "F16", "BF16"):
        return wanted
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]]
    return wanted if array.shape[-1] % block == 0 else "F16"


def model_tensors(state: dict[str, torch.Tensor], config, tied: bool) -> Iterator[tuple[str, np.ndarray]]:
    """``(gguf name, float32 array)`` of every weight of a merged model, in the layout of the module
    docstring. Raises :class:`UserError` for a weight gguf's tables have no name for."""
    import gguf

    arch = architecture(config.model_type)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name.endswith(SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        array = tensor.detach().to(torch.float32).cpu().numpy()
        module = hf_name.rpartition(".")[0]
        heads = _heads_of(module, config) if arch.reorder_qk and hf_name.endswith(".weight") else None
        if heads is not None:
            array = reorder_rotary_rows(array, heads)
        if hf_name.endswith(".weight") and module.endswith(arch.transposed):
            array = np.ascontiguousarray(array.T)
        if arch.norm_offset and hf_name.endswith("norm.weight"):
            array = array + np.float32(arch.norm_offset)
        name = gguf_tensor_name(hf_name, name_map)
        yield name, array
        if tied and arch.write_tied_output and name == "token_embd.weight":
            yield "output.weight", array
    factors = rope_freq_factors(config)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


# ------------------------------------------------------------------------------------------ metadata
def _hyperparameters(writer, config) -> None:
    import gguf

    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    dim = head_dim(config)
    rope = rope_parameters(config)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // heads:  # Qwen3, Gemma: heads not sized hidden / heads
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    arch = architecture(config.model_type)
    if arch.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
        nested = "sliding_attention" in (getattr(config, "rope_parameters", None) or {})
        if nested:  # Gemma 3: the sliding layers rotate with their own base
            writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
    if arch.softcapping:
        if config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


@dataclass
class Vocabulary:
    """A vocabulary as llama.cpp reads it: byte-level BPE (tokenizer model ``gpt2``, with merges and a
    pre-tokenizer name) or SentencePiece-style (``llama``: pieces with scores, byte-fallback tokens)."""

    tokens: list[str]
    types: list[int]
    pre: str | None
    special: object  # gguf.SpecialVocab: merges, special ids, add_bos
    notes: list[str] = field(default_factory=list)
    model: str = "gpt2"
    scores: list[float] | None = None  # llama: higher merges first
    add_space_prefix: bool = False


def vocabulary(tokenizer, tokenizer_dir: Path, vocab_size: int, pre: str | None) -> Vocabulary:
    """The vocabulary of a saved Hugging Face tokenizer (``tokenizer_dir``), ids ``0..vocab_size-1``.

    Token types: special added tokens are control tokens, other added tokens user-defined, ids without a
    token unused placeholders. A SentencePiece-style vocabulary (byte-fallback tokens such as <0x00>) goes
    to :func:`sentencepiece_vocabulary`. Raises :class:`UserError` when llama.cpp's pre-tokenizer name of a
    byte-level BPE vocabulary is unknown."""
    import gguf

    vocab = tokenizer.get_vocab()
    if "<0x00>" in vocab:
        return sentencepiece_vocabulary(tokenizer, tokenizer_dir, vocab_size)
    if pre is None:
        raise UserError(
            "llama.cpp's pre-tokenizer for this vocabulary is not known to lit-lora; give its llama.cpp "
            "name with pre_tokenizer=<name> (for example llama-bpe, qwen2, gpt-2, smollm)"
        )
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError(
            "this tokenizer has no BPE merges; lit-lora's GGUF export writes BPE vocabularies only"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
    }
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif token in added:
            tokens.append(token)
            types.append(int(gguf.TokenType.CONTROL if token in specials else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    return Vocabulary(tokens, types, pre, special)


def sentencepiece_vocabulary(tokenizer, tokenizer_dir: Path, vocab_size: int) -> Vocabulary:
    """A SentencePiece-style vocabulary (Llama 2, Mistral, Gemma, Phi-3: ``▁``-marked pieces, ``<0xNN>``
    byte-fallback tokens) from its Hugging Face ``tokenizer.json``, as llama.cpp's ``llama`` tokenizer
    model reads it. llama.cpp merges the adjacent pair whose joined piece scores highest; SentencePiece's
    BPE scores are the merge order, so each piece scores minus the rank of the merge that makes it (pieces
    no merge makes, such as single characters, score 0). Types: ``<0xNN>`` byte, the unknown token,
    special tokens control, other added tokens user-defined."""
    import json

    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UserError(
            "this SentencePiece-style tokenizer is not a byte-fallback BPE in tokenizer.json; lit-lora's GGUF "
            "export writes byte-level BPE and byte-fallback BPE vocabularies"
        )
    rank: dict[str, int] = {}
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    base = Vocabulary([], [], None, gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    specials = set(tokenizer.all_special_tokens)
    scores = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            base.tokens.append(f"[PAD{i}]")
            base.types.append(int(gguf.TokenType.UNUSED))
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            base.tokens.append(token)
            base.types.append(int(gguf.TokenType.BYTE))
        elif token == tokenizer.unk_token:
            base.tokens.append(token)
            base.types.append(int(gguf.TokenType.UNKNOWN))
        elif token in added or token in specials:
            base.tokens.append(token)
            base.types.append(
                int(gguf.TokenType.CONTROL if token in specials else gguf.TokenType.USER_DEFINED)
            )
        else:
            base.tokens.append(token)
            base.types.append(int(gguf.TokenType.NORMAL))
        scores.append(-float(rank[token]) if token in rank else 0.0)
    base.model, base.scores = "llama", scores
    base.add_space_prefix = _space_prefix(spec)
    return base


def _space_prefix(spec: dict) -> bool:
    """llama.cpp's ``add_space_prefix`` for a tokenizer.json: whether a "▁" is put before each text
    fragment that starts the text or follows a special token. A Prepend normalizer (Llama 2's legacy
    tokenizers) or a Metaspace with ``prepend_scheme="always"`` does that; ``"first"`` (Mistral v0.3-style)
    prepends at the very start only, which after the chat template's leading special token means never:
    False, so that rendered prompts tokenize the same. Gemma prepends nothing."""
    parts = [spec.get("normalizer"), spec.get("pre_tokenizer")]
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(parts)
    if any(n.get("type") == "Prepend" for n in found):
        return True
    return any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") == "always" for n in found)


def pre_tokenizer_for(config, source_gguf: Path | None, given: str | None) -> str | None:
    """llama.cpp's pre-tokenizer name: ``given``, else the one of the base's own GGUF file (the embedded
    model), else what the model type alone decides (:data:`PRE_TOKENIZERS`), else None."""
    if given:
        return given
    if source_gguf is not None:
        return str(read_fields(source_gguf).get("tokenizer.ggml.pre") or "") or None
    if config.model_type == "llama" and config.vocab_size == LLAMA3_VOCAB:
        return "llama-bpe"
    return PRE_TOKENIZERS.get(config.model_type)


def read_fields(path: Path) -> dict[str, object]:
    """Every metadata key of a GGUF file with its value (arrays as lists). gguf's reader takes seconds on
    a 49k-token vocabulary; a file read before (same size and modification time) is not parsed again."""
    stat = Path(path).stat()
    return dict(_read_fields(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read_fields(path: str, size: int, mtime_ns: int) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


# ------------------------------------------------------------------------------------------ writing
@dataclass
class Written:
    """What a writer wrote: tensor count, the types used and the matrices that fell back to float16."""

    tensors: int = 0
    types: dict[str, int] = field(default_factory=dict)
    fallback_f16: list[str] = field(default_factory=list)


# Below 8 bits the embeddings (and the output head, tied to them in small models) stay Q8_0: every
# token's vector passes through them, and llama.cpp's own quantizer keeps them wider for the same reason.
WIDE_TENSORS = ("token_embd.weight", "output.weight")


def _write(writer, tensors: Iterator[tuple[str, np.ndarray]], wanted: str, progress: Callable) -> Written:
    written = Written()
    narrow = wanted.startswith(("Q4", "Q5"))
    for name, array in tensors:
        kind = tensor_type_for(array, "Q8_0" if narrow and name in WIDE_TENSORS else wanted)
        if kind == "F16" and wanted != "F16" and array.ndim >= 2:
            written.fallback_f16.append(name)
        data, raw = _encode(array, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
        written.tensors += 1
        written.types[kind] = written.types.get(kind, 0) + 1
        progress(written.tensors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_model_gguf(
    path: Path,
    model,
    vocab: Vocabulary,
    chat_template: str | None,
    outtype: str,
    general: dict[str, object],
    progress: Callable[[int], None] = lambda n: None,
) -> Written:
    """Write the merged ``model`` (float32 weights) as a GGUF model file at ``path``.

    ``general``: ``general.*`` metadata to record (name, provenance of the base). The caller writes to a
    temporary name and renames (the writer streams into the file)."""
    import gguf

    config = model.config
    arch = architecture(config.model_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    _add_general(writer, general)
    _hyperparameters(writer, config)
    tensor_type, file_type = OUTTYPES[outtype]
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter, in every type
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_add_space_prefix(vocab.add_space_prefix)  # byte-level BPE encodes spaces itself
    vocab.special.add_to_gguf(writer, quiet=True)
    if chat_template:
        writer.add_chat_template(chat_template)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = model_tensors(model.state_dict(), config, tied)
    return _write(writer, tensors, tensor_type, progress)


def _add_general(writer, general: dict[str, object]) -> None:
    for key, value in general.items():
        if value is None:
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, str(value))


# ------------------------------------------------------------------------------------------ LoRA
@dataclass
class LoraPair:
    """One adapted weight: its GGUF name and PEFT's A (r, in) and B (out, r) in GGUF's layout."""

    name: str
    a: np.ndarray
    b: np.ndarray


def lora_pairs(adapter_state: dict[str, torch.Tensor], adapter_config: dict, config) -> list[LoraPair]:
    """The adapter's A/B pairs under the GGUF names of the weights they adapt. B's rows of q/k follow
    the rotary reordering of the base (module docstring); A and B keep PEFT's shapes, which is what
    llama.cpp's loader expects (``lora_a`` (r, in), ``lora_b`` (out, r) as numpy shapes)."""
    import gguf

    if adapter_config.get("use_dora"):
        raise UserError("a DoRA adapter has no llama.cpp LoRA equivalent; export it merged (format=gguf)")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise UserError("per-module ranks or alphas cannot be written as one llama.cpp LoRA alpha")
    if adapter_config.get("modules_to_save"):
        raise UserError("an adapter with modules_to_save holds full weights; export it merged (format=gguf)")
    arch = architecture(config.model_type)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in adapter_state.items():
        stem, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(f"adapter tensor {key!r} is not a LoRA A or B matrix")
        halves.setdefault(stem, {})[part[0]] = tensor.detach().to(torch.float32).cpu().numpy()
    pairs = []
    for module, ab in sorted(halves.items()):
        a, b = ab["A"], ab["B"]
        heads = _heads_of(module, config) if arch.reorder_qk else None
        if heads is not None:
            b = reorder_rotary_rows(b, heads)
        pairs.append(LoraPair(gguf_tensor_name(module + ".weight", name_map), a, b))
    return pairs


def lora_alpha(adapter_config: dict) -> float:
    """The alpha llama.cpp needs to apply ``alpha / r`` as PEFT does (rsLoRA: ``alpha / sqrt(r)``)."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return float(alpha * math.sqrt(r)) if adapter_config.get("use_rslora") else float(alpha)


def write_lora_gguf(
    path: Path, pairs: list[LoraPair], alpha: float, config, outtype: str, general: dict[str, object]
) -> Written:
    """Write a llama.cpp LoRA adapter file: ``<weight>.lora_a`` / ``.lora_b`` tensors and
    ``adapter.lora.alpha``, for the architecture of ``config``."""
    import gguf

    arch = architecture(config.model_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    _add_general(writer, general)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for pair in pairs:
            yield f"{pair.name}.lora_a", pair.a
            yield f"{pair.name}.lora_b", pair.b

    return _write(writer, tensors(), OUTTYPES[outtype][0], lambda n: None)


def read_lora_gguf(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """``({tensor name: float32 array in numpy's order}, alpha)`` of a LoRA GGUF, read back with gguf's
    reader and dequantized: the independent read of the parity gate for ``format=gguf-lora``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    arrays = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        arrays[t.name] = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return arrays, alpha
