"""What the tests share: the repository's paths, the tiny run settings, composing the real ``conf/``,
running the CLI, and small builders (tests import these; ``conftest.py`` holds only fixtures)."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lit_lora.config.schema import (
    LoraConfig,
    ModelConfig,
    QuantConfig,
    SpeedConfig,
    TrainConfig,
    register_configs,
)
from lit_lora.data.batching import MODEL_KEYS, collate
from lit_lora.data.rendering import Rendering, encode_conversation

ROOT = Path(__file__).resolve().parents[1]

CONF = ROOT / "conf"

# Tiny, fast settings shared by tests that train the tiny random model.
TINY = [
    "model=tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32",
    "data.train_size=32",
    "data.val_size=8",
    "data.test_size=4",
    "data.score_max_new_tokens=4",
]

# The same tiny runs with a preference objective: DPO on the built-in pairs (tests that must hold for
# every objective run with and without it).
# Plain DPO: the demo pair alone would add the NLL term (conf/objective_data/dpo_demo_preference.yaml).
DPO = ["objective=dpo", "data=demo_preference", "objective.rpo_alpha=0"]

# Runs whose numbers are compared across world sizes and resumes: fp32, no LoRA dropout, no validation.
EXACT = [*TINY, "lora.dropout=0.0", "score=false", "trainer.limit_val_batches=0"]

CKPT_EVERY_2 = [
    "callbacks.adapter_checkpoint.every_n_train_steps=2",
    "callbacks.adapter_checkpoint.monitor=null",
    "callbacks.adapter_checkpoint.save_top_k=-1",
]


def ddp(*overrides: str) -> tuple[str, ...]:
    """``overrides`` on two gloo CPU processes."""
    return ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides)


def plain_config(
    model: ModelConfig | None = None, quant: QuantConfig | None = None, lora: LoraConfig | None = None
) -> TrainConfig:
    """A training config (default: the embedded SmolLM2) with every speed path off, so that
    ``build_model`` gives plain transformers + PEFT, for tests that put one path on themselves."""
    return TrainConfig(
        model=model or ModelConfig(name_or_path="embedded:smollm2-135m"),
        quant=quant or QuantConfig(),
        lora=lora or LoraConfig(),
        speed=SpeedConfig.off(),
    )


def compose_train(overrides: list[str]):
    """The composed ``train`` config for ``overrides`` (raises Hydra's errors as the CLI would)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


# The console command of the environment the tests run in.
LIT_LORA = Path(sys.executable).parent / "lit-lora"


def run_cli(
    *args: str,
    timeout: float = 120,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    console: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python -m lit_lora.train`` (``console``: ``lit-lora train``) in a subprocess (environment:
    ``env``, default this process's); returns the completed process (text output)."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    command = [str(LIT_LORA), "train"] if console else [sys.executable, "-m", "lit_lora.train"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Run:
    """A finished CLI run: its folder and its completed process."""

    out: Path
    done: subprocess.CompletedProcess


def alpaca_messages(row: dict) -> list[dict[str, str]]:
    """The conversation of an alpaca-style demo row (as :func:`lit_lora.data.rows.to_row` builds it)."""
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def demo_batch(tokenizer, rows: list[dict], max_len: int = 256) -> dict:
    """A padded batch of alpaca-style rows, rendered with the tokenizer's own template; model keys only."""
    rendering = Rendering.resolve(tokenizer)
    examples = []
    for row in rows:
        ids, labels = encode_conversation(tokenizer, rendering, alpaca_messages(row))
        examples.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    batch = collate(examples, tokenizer.pad_token_id)
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def train_with_accumulation(
    tmp_path: Path, overrides: list[str]
) -> dict[tuple[int, int], tuple[float, dict]]:
    """``{(micro, accum): (final train loss, adapter weights)}`` of three runs with the same global batch
    of 8: 8 x 1, 4 x 2 and 2 x 4 (``overrides`` make them exact: fp32, no dropout, no validation)."""
    from peft import get_peft_model_state_dict

    from lit_lora.training.run import train

    results = {}
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        result = train(
            compose_train(
                [
                    *overrides,
                    f"output_dir={tmp_path / f'{micro}x{accum}'}",
                    f"data.batch_size={micro}",
                    f"trainer.accumulate_grad_batches={accum}",
                ]
            )
        )
        weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(result.model).items()}
        results[(micro, accum)] = (result.summary["final_train_loss"], weights)
    return results


def assert_same_steps(results: dict[tuple[int, int], tuple[float, dict]], bound: float = 1e-5) -> None:
    """Every run of :func:`train_with_accumulation` ends with 8 x 1's loss and adapter, within ``bound``."""
    loss_ref, weights_ref = results[(8, 1)]
    assert any(w.abs().max() > 0 for k, w in weights_ref.items() if "lora_B" in k), "B must have moved"
    for key, (loss, weights) in results.items():
        assert abs(loss - loss_ref) < bound, (key, loss, loss_ref)
        assert max((weights[k] - weights_ref[k]).abs().max().item() for k in weights_ref) < bound, key


def tiny_model_config(**overrides) -> ModelConfig:
    """``model=tiny`` (conf/model/tiny.yaml: a 2-layer random Llama with SmolLM2's tokenizer) as a config
    object, with ``overrides`` applied."""
    import yaml

    return ModelConfig(**{**yaml.safe_load((CONF / "model" / "tiny.yaml").read_text()), **overrides})


def tiny_lora_model(**lora) -> torch.nn.Module:
    """The tiny random Llama (fp32) with a LoRA whose B weights are non-zero (B = 0 would hide errors)."""
    from lit_lora.models.builder import build_model

    model_cfg = tiny_model_config()
    torch.manual_seed(0)
    model = build_model(plain_config(model_cfg, lora=LoraConfig(**lora))).model
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def loss_and_grads(model, ids, seed=7):
    torch.manual_seed(seed)  # the same dropout masks for both paths
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def tensor_names(folder: Path) -> dict[str, set[str]]:
    """The tensor names of each safetensors file in ``folder``, by file name."""
    from safetensors import safe_open

    names = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names[file.name] = set(f.keys())
    return names


def assert_like_save_pretrained(folder: Path, scratch: Path) -> None:
    """``folder`` holds the files and tensor names of transformers' ``save_pretrained`` of its model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.save_pretrained(str(scratch))
    assert tensor_names(folder) == tensor_names(scratch)
    assert {p.name for p in scratch.iterdir()} <= {p.name for p in folder.iterdir()}


# The package's import graph (tests/test_imports.py checks it; other tests read one module's edges).
PACKAGE = ROOT / "lit_lora"


def _module_name(path) -> str:
    """``builder`` for lit_lora/models/builder.py, ``speedups.attention`` for lit_lora/speedups/attention.py,
    ``speedups`` for its ``__init__.py``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The lit_lora modules one import statement names (``from lit_lora.x import y`` names ``x.y`` when
    that is a module, else ``x``)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lit_lora":
        base = node.module.removeprefix("lit_lora").lstrip(".")
        names = {f"{base}.{a.name}".lstrip(".") for a in node.names}
        return {n if n in modules else base for n in names} - {""}
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("lit_lora.") for a in node.names if a.name.startswith("lit_lora.")}
    return set()


def import_graph() -> dict[str, set[str]]:
    """``{module: lit_lora modules it imports anywhere in its body}`` for every module of the package,
    subpackages included."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py") if path.parent.name != "__pycache__"}
    modules = set(paths) - {""}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(paths[name].read_text())):
            deps |= _imported(node, modules)
        graph[name] = (deps & modules) - {name}
    return graph


def free_port() -> int:
    """A port free on every address (rank zero's TCP store binds them all), chosen by the kernel."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
