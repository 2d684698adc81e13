"""Every model folder lit-lora writes is a standard checkpoint: the weight files and tensor names that
transformers' own ``save_pretrained`` writes for the same model (tied weights under the input
embedding's name), so tools that read tensors by name (litgpt's converter, llama.cpp's) find them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_lora.models import embedded
from tests.helpers import assert_like_save_pretrained, tensor_names

EMBEDDED = "embedded:smollm2-135m"


@pytest.mark.slow
def test_the_embedded_cache_is_what_save_pretrained_writes(tmp_path):
    folder = embedded.resolve(EMBEDDED)
    assert_like_save_pretrained(folder, tmp_path / "reference")
    names = set().union(*tensor_names(folder).values())
    # SmolLM2 ties its output head to the input embedding: stored once, under the input's name.
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


@pytest.mark.slow
def test_a_cache_written_in_the_old_layout_is_rewritten_once(tmp_path, monkeypatch, capsys):
    current = embedded.resolve(EMBEDDED)
    # The layout lit-lora wrote before: tied embedding only as lm_head.weight, marker without "format".
    # Built from the current cache rather than from the GGUF file, which takes about 25 s to dequantize.
    old = tmp_path / "cache" / "models" / current.name
    shutil.copytree(current, old, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(current / "model.safetensors"))
    old_tensors = {
        ("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in tensors.items()
    }
    save_file(old_tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    marker = json.loads((current / embedded.COMPLETE_MARKER).read_text())
    (old / embedded.COMPLETE_MARKER).write_text(
        json.dumps({"source": marker["source"], "name": marker["name"]})
    )
    monkeypatch.setenv("LIT_LORA_CACHE", str(tmp_path / "cache"))

    assert embedded.resolve(EMBEDDED) == old
    assert "rewriting" in capsys.readouterr().out
    assert tensor_names(old) == tensor_names(current)
    rewritten = load_file(str(old / "model.safetensors"))
    assert all(torch.equal(rewritten[k], tensors[k]) for k in tensors), "the weights are kept bit for bit"
    assert json.loads((old / embedded.COMPLETE_MARKER).read_text())["format"] == embedded.FORMAT
    assert [p.name for p in old.parent.iterdir()] == [old.name], "no temporary folder left behind"

    assert embedded.resolve(EMBEDDED) == old
    assert "rewriting" not in capsys.readouterr().out, "rewritten once, not on every run"
