"""The ``lit-lora`` console command: one table of commands, one entry pattern, user config folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lit_lora.config.commands import COMMANDS
from tests.helpers import EXACT, ROOT, TINY, ddp

LIT_LORA = Path(sys.executable).parent / "lit-lora"


def lit_lora(
    *args: str, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(LIT_LORA), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_command_with_one_line():
    done = lit_lora("--help")
    assert done.returncode == 0, done.stderr
    for command in COMMANDS.values():
        assert f"  {command.name}" in done.stdout and command.summary in done.stdout


def test_an_unknown_command_lists_the_commands_and_exits_2():
    done = lit_lora("trian", "model=tiny")
    assert done.returncode == 2
    assert "unknown command 'trian'" in done.stderr and all(name in done.stderr for name in COMMANDS)


def test_a_command_help_shows_its_config_groups():
    done = lit_lora("train", "--help")
    assert done.returncode == 0, done.stderr
    assert "model:" in done.stdout and "tiny" in done.stdout and "quant:" in done.stdout
    compare = lit_lora("compare", "--help")
    assert compare.returncode == 0 and "sweep folder" in compare.stdout


@pytest.mark.parametrize("flag", [["--config-dir", "nowhere"], ["--config-dir=nowhere"], ["-cd", "nowhere"]])
def test_a_user_config_folder_that_does_not_exist_is_refused(flag, tmp_path):
    done = lit_lora("train", *flag, "model=tiny", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "lit-lora: error: " + f"{flag[0].partition('=')[0]} nowhere: no such folder"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


def _refusal(args: list[str], capsys) -> tuple[int, str]:
    """``lit-lora <args>`` run in this process (the same :func:`lit_lora.cli.main`): its exit status and
    stderr, for refusals that end before Hydra starts."""
    from lit_lora.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err


def test_every_command_refuses_an_output_path_outside_the_root_before_hydra(tmp_path, monkeypatch, capsys):
    """The same confinement keys, listed once in the command table, for every command (in this process;
    the console script is checked once below)."""
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("LIT_LORA_OUTPUT_ROOT", str(root))
    keys = [(name, key) for name, command in COMMANDS.items() for key in command.path_keys]
    assert {name for name, _ in keys} == {"train", "evaluate", "merge", "export"}
    for name, key in keys:
        code, err = _refusal([name, f"{key}={outside}"], capsys)
        assert code == 2 and f"{key}={outside} is outside the output root" in err, (name, key, err)
    done = lit_lora("train", f"hydra.run.dir={outside}", cwd=root, env={"LIT_LORA_OUTPUT_ROOT": str(root)})
    assert done.returncode == 2 and "is outside the output root" in done.stderr
    assert not outside.exists() and list(root.iterdir()) == []


def test_a_moved_key_is_named_by_every_hydra_command(capsys):
    from lit_lora.config.moved_keys import MOVED_KEYS

    old, new = next(iter(MOVED_KEYS.items()))
    for name in ("train", "evaluate", "serve"):
        code, err = _refusal([name, f"{old}=1"], capsys)
        assert code == 2 and f"{old} is now {new}" in err, (name, err)


@pytest.mark.slow
def test_a_user_config_folder_and_callback_module_from_the_working_directory(tmp_path):
    """The Hydra way to add one's own configs: ``--config-dir`` joins the search path, and a ``_target_``
    names a module in the working directory, as with ``python -m``."""
    (tmp_path / "my_conf" / "callbacks").mkdir(parents=True)
    marker = tmp_path / "seen.json"
    (tmp_path / "my_callbacks.py").write_text(
        textwrap.dedent(
            """
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
        )
    )
    (tmp_path / "my_conf" / "callbacks" / "steps.yaml").write_text(
        f"steps:\n  _target_: my_callbacks.Steps\n  path: {marker}\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [str(LIT_LORA), "train", "--config-dir", "my_conf", *TINY, "+callbacks=steps", "score=false",
         f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(marker.read_text()) == {"steps": 4}


@pytest.mark.slow
def test_the_console_command_starts_the_other_ranks_of_a_ddp_run(tmp_path):
    """Lightning starts rank one by rebuilding this process's command line; under the console script
    (no ``__main__.__spec__``) it must still name the command (:func:`lit_lora.cli._relaunch_as`)."""
    out = tmp_path / "run"
    done = lit_lora(
        "train", *ddp(*EXACT), "trainer.max_steps=2", f"output_dir={out}", "data.batch_size=4",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 2
    assert "2 devices" in done.stdout
