"""The ``lit-lora`` console command: one table of commands, one entry pattern, user config folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_lora.config.commands import COMMANDS
from tests.helpers import ROOT

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


def test_the_console_command_starts_the_other_ranks_of_a_ddp_run(ddp_run):
    """Lightning starts rank one by rebuilding this process's command line; under the console script
    (no ``__main__.__spec__``) it must still name the command (:func:`lit_lora.cli._relaunch_as`). The
    shared 2-rank run (``ddp_run`` in conftest.py) is started as ``lit-lora train``."""
    summary = json.loads((ddp_run.out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert "x 2 devices" in ddp_run.done.stdout
