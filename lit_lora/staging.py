"""Publish a folder atomically: write it under a hidden temporary name beside its target, then rename it.

Contract of ``with staged_folder(target) as tmp:`` (the body writes the folder's contents into ``tmp``):

- Under its final name, ``target`` is complete or absent. ``tmp`` is a new hidden folder
  ``.<target name>.<random>`` (or ``<prefix><random>``) in ``target``'s own parent, created with the
  parent if needed; being on the same filesystem, it is published by one ``rename``, which POSIX
  makes atomic. Readers that skip hidden names never see a half-written folder.
- If the body raises (any exception, ``KeyboardInterrupt`` included), ``tmp`` is removed, ``target``
  is left as it was and the exception propagates. ``tmp`` is removed whatever happens; only a process
  killed outright leaves it behind.
- An existing ``target``, by default: an empty folder is replaced (POSIX ``rename`` does that); a
  non-empty one makes the rename fail with :class:`OSError`, and the new contents are discarded.
- ``keep_if_has=<file name>``: when that rename fails and ``target`` holds this file, another process
  (a DDP rank, a parallel job) published the same folder first: its folder is kept, ours is discarded,
  and no error is raised.
- ``replace=True``: an existing ``target`` is renamed aside (hidden, under ``tmp``'s name plus
  ``.old``), the new folder is renamed in, then the old one is deleted. Between the two renames
  ``target`` is absent for an instant; if the second rename fails the old folder is put back.
- ``mode``: the published folder's permissions. ``None`` keeps those ``os.mkdir`` gives (0o777 less the
  umask); with a mode, ``tmp`` is private (0o700) while it is written and gets ``mode`` just before
  the rename.

:func:`scratch_folder` is the hidden temporary folder alone (removed on exit, never renamed), for
callers that move files out of it one by one; :func:`write_file_atomic` (and :func:`write_text_atomic`)
is the same idea for one file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def scratch_folder(parent: Path, prefix: str, *, mode: int = 0o700) -> Iterator[Path]:
    """A new folder ``<prefix><random>`` in ``parent`` (created if needed), removed with its contents
    on exit, whether the body succeeded or not. ``mode`` is the creation mode (the umask applies)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=mode)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_folder(
    target: Path,
    *,
    replace: bool = False,
    keep_if_has: str | None = None,
    mode: int | None = None,
    prefix: str | None = None,
) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``; rename it to ``target`` when the body succeeds.

    See the module docstring for the contract. ``prefix`` names the temporary folder (default
    ``.<target name>.``); a caller that cleans up leftovers by name chooses one it recognises.
    """
    target = Path(target)
    with scratch_folder(
        target.parent, prefix or f".{target.name}.", mode=0o777 if mode is None else 0o700
    ) as tmp:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if replace and target.exists():
            _swap(tmp, target)
            return
        try:
            os.replace(tmp, target)
        except OSError:
            if keep_if_has is None or not (target / keep_if_has).is_file():
                raise


def _swap(new: Path, target: Path) -> None:
    """Put the folder ``new`` in place of the existing ``target``, then delete the old one."""
    old = new.with_name(f"{new.name}.old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        with suppress(OSError):
            os.replace(old, target)  # the previous folder is better than none
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write ``path`` through a hidden temporary file in its folder and one rename: readers see the old
    file or the new one, never a part. ``mode``: the file's permissions (``mkstemp`` alone gives 0o600)."""
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(text), mode=mode)


def write_file_atomic(path: Path, write: Callable[[Path], object], *, mode: int = 0o644) -> None:
    """``write(tmp)`` fills a hidden temporary file in ``path``'s folder (created if needed), which one
    rename then publishes as ``path``; if ``write`` raises, the temporary file is removed and ``path`` is
    left as it was. For writers that take a file name (``safetensors.torch.save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
