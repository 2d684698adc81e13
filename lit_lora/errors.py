"""Exceptions that end a run with one message and a dedicated exit status, never a traceback.

Anything the user can fix (a typo, a missing model, an unsupported device) is raised as
:class:`UserError` (exit 2). Resource failures have their own status so that schedulers and scripts
can tell them apart: :class:`OutOfMemory` (3), :class:`DiskFull` (4), :class:`RankLost` (5, a process of
a multi-process run died), :class:`Interrupted` (143, a signal asked the run to stop and a checkpoint was
saved). Every other exception is a bug in lit-lora
and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's config, data or environment, with a message that says what to change."""

    exit_code = 2


class OutOfMemory(UserError):
    """The device ran out of memory; the message gives the batch shape and concrete remedies."""

    exit_code = 3


class DiskFull(UserError):
    """A write failed for lack of space; the previous checkpoint is intact."""

    exit_code = 4


class RankLost(UserError):
    """Another rank of a multi-process run died or stopped answering; the run folder stays resumable."""

    exit_code = 5


class Interrupted(UserError):
    """SIGTERM / SIGUSR1 stopped the run after saving a checkpoint (resume with ``resume=auto``)."""

    exit_code = 143


def exit_with(err: UserError) -> NoReturn:
    """End the process as every lit-lora command ends a user mistake: one line on stderr, then the
    error's own exit status."""
    print(f"lit-lora: error: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
