"""lit_lora.training.launcher without a training run: which endings count as a lost rank, and the words of
the line that reports one. The whole path (a 2-process run whose rank 1 is killed) is in
tests/training/test_ddp_signals.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from lit_lora.training.launcher import RankWatch, _collective_failure, _first_words, describe_status


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.parametrize(("status", "words"), [(-9, "was killed by SIGKILL"), (2, "exited with status 2")])
def test_describe_status_names_the_signal_or_the_status(status, words):
    assert describe_status(status) == words


def test_the_watch_reports_a_killed_rank_and_not_one_that_stopped_on_a_signal():
    stopped = _child("import sys; sys.exit(143)")  # a graceful stop: its checkpoint is saved
    done = _child("pass")
    killed = _child("import time; time.sleep(60)")
    reported: list[tuple[int, subprocess.Popen]] = []
    seen = threading.Event()
    watch = RankWatch(
        [stopped, done, killed], lambda index, proc: (reported.append((index, proc)), seen.set())
    )
    watch.start()
    stopped.wait(30), done.wait(30)
    assert not seen.wait(1.5), "a rank that ended with 0 or 143 is not lost"
    killed.send_signal(signal.SIGKILL)
    assert seen.wait(10)
    assert reported == [(3, killed)] and killed.returncode == -signal.SIGKILL
    watch.stop()


def test_a_collective_error_is_told_from_a_bug_and_said_in_its_first_words():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:51855: "
        "Connection reset by peer. This is typically caused by a remote worker hanging."
    )
    assert _collective_failure(gloo)
    assert _first_words(gloo) == "Read error [127.0.0.1]:51855: Connection reset by peer"
    assert not _collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not _collective_failure(ValueError("Connection reset by peer"))
