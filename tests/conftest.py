"""The suite's fixtures (what the tests share otherwise lives in :mod:`tests.helpers`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lit_lora.config.schema import (
    ModelConfig,
)
from tests.helpers import CKPT_EVERY_2, EXACT, Run, compose_train, ddp, run_cli


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer, the real one training uses (loaded once per session; a test that
    changes it restores it)."""
    from lit_lora.models.builder import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="embedded:smollm2-135m"), "embedded:smollm2-135m", True)


@pytest.fixture(scope="session", autouse=True)
def output_root(tmp_path_factory):
    """Runs in tests write under pytest's temporary root: make it the output root (lit_lora/paths.py), for
    this process and the training subprocesses it starts, so a test that writes elsewhere fails."""
    from lit_lora.paths import OUTPUT_ROOT_ENV

    root = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OUTPUT_ROOT_ENV, str(root))
        yield root


@pytest.fixture
def compose_cfg():
    return compose_train


@pytest.fixture
def cli():
    return run_cli


# The two runs below are shared by the DDP tests (several files): starting a 2-process run costs ~15 s of
# imports and set-up alone on the CI machine, so each is paid once per session.
@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Run:
    """``EXACT`` for 4 steps in one process, micro-batch 8, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("reference")
    done = run_cli(*EXACT, *CKPT_EVERY_2, f"output_dir={out}", "data.batch_size=8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return Run(out, done)


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Run:
    """The same 4 steps on two gloo processes (micro-batch 4 each: the same global batch), through the real
    CLI, whose rank zero starts rank one; each rank reports the threads alive at its exit
    (:mod:`tests.exit_threads`)."""
    from tests.exit_threads import reporting_env

    out = tmp_path_factory.mktemp("ddp")
    env = reporting_env(tmp_path_factory.mktemp("site"))
    # Through the console command: rank zero is `lit-lora train`, which must start rank one as
    # `python -m lit_lora.train` (lit_lora.cli._relaunch_as); the other DDP tests start `python -m`.
    done = run_cli(
        *ddp(*EXACT, *CKPT_EVERY_2, f"output_dir={out}", "data.batch_size=4"),
        timeout=300,
        env=env,
        console=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Run(out, done)


# pytest-xdist (make test: -n 2 --dist loadscope): a work unit goes to one worker whole, so that its module
# and session fixtures (a trained run, a server) are built once. A unit is a test file, except that the files
# whose tests use the session runs above share one unit (a checked list: see below).
SHARED_RUNS = {"reference_run", "ddp_run"}
SHARED_RUN_FILES = frozenset(
    {
        "tests/test_cli.py",
        "tests/training/test_ddp_shutdown.py",
        "tests/training/test_distributed.py",
        "tests/training/test_fsdp.py",
    }
)


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its file, or ``shared-runs`` for :data:`SHARED_RUN_FILES`."""
    path = nodeid.split("::", 1)[0]
    return "shared-runs" if path in SHARED_RUN_FILES else path


# Seconds each work unit took (the sum of its tests' setup, call and teardown), measured with
# ``make test-durations``: the scheduler starts the longest units first, so that the two workers end
# together instead of one waiting on the last long file. A unit not listed (a new file) is guessed.
UNIT_SECONDS = Path(__file__).with_name("unit_seconds.json")
UNIT_SECONDS_ENV = "LIT_LORA_RECORD_UNIT_SECONDS"  # make test-durations: where to write them


def _unit_seconds(items) -> dict[str, float]:
    """Measured seconds per unit; for a unit without a measurement, 10 s per slow test and 0.5 s per other."""
    measured = json.loads(UNIT_SECONDS.read_text()) if UNIT_SECONDS.is_file() else {}
    guessed: dict[str, float] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        guessed[unit] = guessed.get(unit, 0.0) + (10.0 if item.get_closest_marker("slow") else 0.5)
    return {unit: float(measured.get(unit, guess)) for unit, guess in guessed.items()}


def pytest_collection_modifyitems(config, items):
    """Longest units first (:data:`UNIT_SECONDS`); within a unit the order stays as collected. Fails when a
    test outside :data:`SHARED_RUN_FILES` uses a shared run (it would build that run a second time)."""
    for item in items:
        if SHARED_RUNS & set(item.fixturenames) and work_unit(item.nodeid) != "shared-runs":
            raise pytest.UsageError(f"{item.nodeid} uses a shared run: add its file to SHARED_RUN_FILES")
    seconds = _unit_seconds(items)
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(work_unit(item.nodeid), index)
    items.sort(key=lambda item: (-seconds[work_unit(item.nodeid)], first[work_unit(item.nodeid)]))


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """With :data:`UNIT_SECONDS_ENV` set, add up each unit's seconds (on the xdist controller, from the
    workers' reports)."""
    if os.environ.get(UNIT_SECONDS_ENV):
        unit = work_unit(report.nodeid)
        _measured[unit] = _measured.get(unit, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(UNIT_SECONDS_ENV)
    if path and _measured and not hasattr(session.config, "workerinput"):  # the controller writes
        ordered = dict(sorted(((u, round(s, 1)) for u, s in _measured.items()), key=lambda kv: -kv[1]))
        Path(path).write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with :func:`work_unit` as the scope (pytest 9 ignores the node ids that xdist
    3.8's ``loadgroup`` rewrites, so its groups would not hold)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return UnitScheduling(config, log)
