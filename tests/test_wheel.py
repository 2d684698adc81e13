"""The installed package, as a user gets it: a wheel built from this checkout and installed into a fresh
virtual environment runs every command from a folder outside the repository.

The fresh environment sees the dependencies of the project's ``.venv`` through a ``.pth`` line (its site
folder is added as a plain path, so the editable install of lit-lora there is not: only the wheel's
lit-lora can be imported).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

STEPS_CALLBACK = """
import json
import lightning as L


class Steps(L.Callback):
    def __init__(self, path: str):
        self.path, self.steps = path, 0

    def on_train_batch_end(self, *args):
        self.steps += 1

    def on_train_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"steps": self.steps}, f)
"""

# What a wheel is built from (tests, benchmarks and experiments stay in the repository).
SOURCES = ("pyproject.toml", "README.md", "lit_lora", "callbacks", "conf")


def _run(
    *args, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the sources (a build folder left in the checkout by an earlier build could
    slip removed modules into it)."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = src / "dist"
    done = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src,
        cwd=src,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = dist.glob("lit_lora-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel; returns its ``bin`` folder."""
    venv = tmp_path_factory.mktemp("wheel-venv")
    done = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=venv).stdout.strip()
    )
    (site / "_lit_lora_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        wheel,
        cwd=venv,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def test_the_wheel_holds_the_configs_and_no_top_level_callbacks(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"lit_lora"}, tops
    assert "lit_lora/conf/train.yaml" in names and "lit_lora/conf/model/tiny.yaml" in names
    assert "lit_lora/callbacks/retention.py" in names and "lit_lora/samples/retention_probes.json" in names
    conf = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"lit_lora/{p}" for p in conf} <= set(names), "every config file travels"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lit-lora = lit_lora.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_package_folder_is_in_the_wheel(wheel):
    """pyproject.toml lists the packages by hand (two of them map folders from the repository's top
    level): a new wing must be added there, or the wheel would lack it."""
    names = zipfile.ZipFile(wheel).namelist()
    folders = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "lit_lora").rglob("*.py")}
    folders -= {f for f in folders if "__pycache__" in f}
    assert {f for f in folders if not any(n.startswith(f + "/") for n in names)} == set()


@pytest.mark.slow
def test_the_installed_command_runs_from_any_folder(installed, tmp_path):
    """``lit-lora --help``, a 2-step training run of the tiny model and ``lit-lora evaluate`` on its
    adapter, from an empty folder outside the checkout, with the wheel's lit-lora."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    env["LIT_LORA_OUTPUT_ROOT"] = str(work)
    lit_lora = installed / "lit-lora"

    where = _run(
        installed / "python",
        "-c",
        "import lit_lora, lit_lora.callbacks as c; print(lit_lora.__file__, c.__file__)",
        cwd=work,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert str(ROOT) not in where.stdout and str(installed.parent) in where.stdout, where.stdout
    no_plugin = _run(installed / "python", "-c", "import callbacks", cwd=work, env=env)
    assert no_plugin.returncode != 0, "a top-level 'callbacks' package is importable"

    helped = _run(lit_lora, "--help", cwd=work, env=env)
    assert helped.returncode == 0 and "train" in helped.stdout and "serve" in helped.stdout, helped.stderr

    # A user's own config folder and callback module, the Hydra way (--config-dir) and from the working
    # directory, as the README shows.
    (work / "my_conf" / "callbacks").mkdir(parents=True)
    (work / "my_conf" / "callbacks" / "steps.yaml").write_text(
        f"steps:\n  _target_: my_callbacks.Steps\n  path: {work / 'steps.json'}\n"
    )
    (work / "my_callbacks.py").write_text(STEPS_CALLBACK)
    trained = _run(
        lit_lora, "train", "--config-dir", "my_conf", "+callbacks=steps", "model=tiny", "trainer.max_steps=2",
        "score=false", cwd=work, env=env, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert json.loads((work / "steps.json").read_text()) == {"steps": 2}
    (summary,) = (work / "runs").glob("*/*/summary.json")
    adapter = summary.parent / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    evaluated = _run(
        lit_lora, "evaluate", "model=tiny", f"adapters=[{adapter}]", "data.test_size=4", "generate=false",
        f"work_dir={work / 'eval'}", cwd=work, env=env, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-3000:]
    assert (work / "eval" / "evaluation.json").is_file()
