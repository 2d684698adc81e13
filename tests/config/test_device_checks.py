"""CUDA-only options are refused at config time, before any weight or row is loaded.

Every case names a model folder that does not exist: had the model builder run first, the error would
be about that folder. The device message therefore proves the order, and nothing of the run folder
may have been written.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from lit_lora.errors import UserError
from lit_lora.training.run import train
from tests.helpers import compose_train

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusals on a machine without CUDA"
)

MISSING_MODEL = "model.name_or_path=/nonexistent/lit-lora-model"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=fsdp"], "use trainer=ddp"),
        (["trainer=fsdp", "quant=nf4"], "trainer.strategy=fsdp needs a CUDA device"),
        (["trainer=fsdp", "trainer.accelerator=cpu", "quant=int8"], "cannot shard quant=int8"),
        (["trainer=fsdp", "trainer.accelerator=cpu"], "with one device has nothing to shard"),
        (
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "optim=paged_adamw_8bit"],
            "use optim=adamw with FSDP",
        ),
        (
            ["trainer=fsdp", "trainer.strategy=fsdp_cpu_offload", "trainer.accelerator=cpu"],
            "not built by lit-lora",
        ),
        (
            [
                "trainer=fsdp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "quant=nf4",
                "trainer.precision=32",
            ],
            "needs trainer.precision=bf16-mixed",
        ),
        (["trainer=deepspeed_zero2"], "trainer.strategy=deepspeed_zero2 is not supported"),
        (["trainer=deepspeed_zero3", "trainer.accelerator=cpu"], "ZeRO-3 partitions weights"),
        (["optim=paged_adamw_8bit"], "use optim=adamw"),
        (["trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a CUDA device"),
        (["trainer.precision=16-true"], "the loss is NaN from step 2"),
    ],
)
def test_cuda_only_options_are_refused_before_the_model_loads(tmp_path, overrides, message):
    out = tmp_path / "run"
    cfg = compose_train(["model=tiny", MISSING_MODEL, f"output_dir={out}", *overrides])
    # No time bound: the missing model folder already proves the refusal comes before any weight loads,
    # and a bound would measure the machine's load (under two busy test workers the first call's lazy
    # imports alone have taken 14 s).
    with pytest.raises(UserError) as err:
        train(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists(), "a refused run writes nothing"


def test_fsdp_on_cpu_from_the_command_line_is_one_line_before_any_weight(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lit_lora.train", "trainer=fsdp",
         MISSING_MODEL, f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("lit-lora: error: trainer.strategy=fsdp needs a CUDA device")
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
    # The process time is mostly importing torch and Lightning; this loose bound only catches a check
    # that comes late (after the model or data loads), not the machine's speed.
    assert elapsed < 60, f"{elapsed:.1f} s"
    print(f"fsdp on CPU refused by the CLI in {elapsed:.1f} s", file=sys.stderr)
