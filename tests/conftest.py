"""The suite's fixtures (what the tests share otherwise lives in :mod:`tests.helpers`)."""

from __future__ import annotations

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


# Tests whose session fixtures are paid once per process: under pytest-xdist they go to one worker together.
_SHARED_RUNS = {"reference_run", "ddp_run"}


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (``make test``) a file's tests stay on one worker, so a module
    fixture (a trained run, a server) is built once, and the tests that use the session runs above share one
    worker. Without xdist the marker is inert."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        group = "shared-runs" if _SHARED_RUNS & set(item.fixturenames) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
