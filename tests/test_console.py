"""What a user sees: progress in a log file, no unexplained warning, nothing overwritten by the CSV
logger, and the Python API composing exactly what the command line composes (issue 20)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest

from lit_lora import train as train_command
from lit_lora.errors import UserError
from lit_lora.training.run import train
from tests.helpers import ROOT, TINY, compose_train

# A short run with every callback of the default run; log_every_n_steps=2 so the lines come by step.
SHORT = [o for o in TINY if not o.startswith("trainer.log_every_n_steps")] + [
    "trainer.log_every_n_steps=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
]


def _listed_warnings() -> list[str]:
    """The message fragments the README's "Console" section lists (one backticked fragment per item)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Console", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [
        m
        for line in section.splitlines()
        if line.startswith("- ")
        for m in re.findall(r"`([^`]+)`", line)[:1]
    ]


# Python's warning format (Lightning drops the category for its own: "file.py:21: message"), and
# logging's WARNING level.
WARNING_LINE = re.compile(r"\w+Warning\b|^\S+\.py:\d+: |\bWARNING\b")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run of the short job, output not a terminal (a pipe), as under nohup / SLURM / CI."""
    from tests.helpers import run_cli

    out = tmp_path_factory.mktemp("console") / "cli"
    done = run_cli(*SHORT, f"output_dir={out}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_a_log_file_gets_a_progress_line_per_interval_and_no_unlisted_warning(cli_run):
    _, done = cli_run
    steps = [int(m.group(1)) for m in re.finditer(r"^lit-lora: step (\d+)/6 \(epoch \d\)", done.stdout, re.M)]
    assert steps == [2, 4, 6], done.stdout  # every log_every_n_steps steps, and the last step
    assert re.search(r"^lit-lora: step 6/6 .*tokens/s, elapsed \d+m\d\ds", done.stdout, re.M)
    assert re.search(r"^lit-lora: scoring fine-tuned: 1/1 batches, elapsed", done.stdout, re.M)
    listed = _listed_warnings()
    assert listed, "the README's Console section lists the warnings a run may show"
    unlisted = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if WARNING_LINE.search(line) and not any(fragment in line for fragment in listed)
    ]
    assert unlisted == [], unlisted
    assert "will be deleted" not in done.stdout + done.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_csv_logger_never_deletes_and_never_says_it_will(tmp_path):
    first, second = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    train(compose_train([*TINY, f"output_dir={first}", "score=false"]))
    before = _digests(first)
    assert "metrics.csv" in before and "hparams.yaml" in before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_train([*TINY, f"output_dir={second}", "score=false"]))
    assert _digests(first) == before, "the second run changed a file of the first"
    assert not [w for w in caught if "will be deleted" in str(w.message)]


def test_the_python_api_composes_and_runs_what_the_cli_does(cli_run, output_root):
    cli_out, _ = cli_run
    summary = train_command.run(SHORT)  # no output_dir: the CLI's run folder, <root>/runs/<date>/<time>
    api_out = max((output_root / "runs").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime).parent
    assert re.fullmatch(
        r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}", api_out.relative_to(output_root / "runs").as_posix()
    )
    assert summary == json.loads((api_out / "summary.json").read_text())
    cli_summary = json.loads((cli_out / "summary.json").read_text())
    assert summary.keys() == cli_summary.keys() and summary["global_step"] == cli_summary["global_step"] == 6

    def config(folder: Path) -> str:  # the run's own folder is the one difference there may be
        return (folder / "config.yaml").read_text().replace(str(folder), "<run folder>")

    assert config(api_out) == config(cli_out)


def test_a_user_mistake_raises_the_cli_message(tmp_path, cli):
    overrides = [*TINY, "lora.r=0", f"output_dir={tmp_path / 'r0'}"]
    done = cli(*overrides)
    assert done.returncode == 2
    with pytest.raises(UserError) as info:
        train_command.run(overrides)
    assert done.stderr.strip() == f"lit-lora: error: {info.value}"
    with pytest.raises(UserError, match=r"lora\.fused_linear is now speed\.fused_lora_linear"):
        train_command.run(["lora.fused_linear=false"])


def test_the_terminal_bar_counts_optimizer_steps_of_max_steps(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_lora.progress import StepProgressBar

    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert bar.total_train_batches == 5  # Lightning's own bar counted an epoch's 64 batches
    assert bar._get_train_description(0) == "step 5/5 · epoch 0"
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.completed == 5 and task.description == "step 5/5 · epoch 0"


def test_an_interrupted_runs_logs_are_kept_never_overwritten(tmp_path):
    from lit_lora.training.run import _check_fresh, _keep_earlier_files

    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.0\n")
    (tmp_path / "hparams.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match="interrupted run; continue it with resume=auto"):
        _check_fresh(tmp_path, resuming=False)
    _check_fresh(tmp_path, resuming=True)
    _keep_earlier_files(tmp_path, 0)  # resume=auto without a checkpoint: killed before the first one
    (tmp_path / "metrics.csv").write_text("step,loss\n1,1.5\n")
    _keep_earlier_files(tmp_path, 0)  # killed again before a checkpoint
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["hparams.until-step-0.yaml", "metrics.until-step-0-2.csv", "metrics.until-step-0.csv"]
    assert (tmp_path / "metrics.until-step-0.csv").read_text().endswith("2.0\n")
