"""Where lit-lora may write: every output path must lie inside the output root.

The output root is ``output_root`` when a command sets it, else ``$LIT_LORA_OUTPUT_ROOT``, else the
working directory. A path that leaves it, through ``..`` or as an absolute path elsewhere, is refused
before anything is written, as is a NUL byte. The check is lexical (``..`` is collapsed, symbolic links
are not followed): a ``runs -> /scratch/runs`` link the user made stays usable, while a value typed on a
command line or taken from a config cannot point the run at ``/etc`` or at a neighbour's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_lora.errors import UserError

OUTPUT_ROOT_ENV = "LIT_LORA_OUTPUT_ROOT"


def output_root(configured: str | None = None) -> Path:
    """The absolute, normalised output root (see the module docstring for the order of sources)."""
    value = configured or os.environ.get(OUTPUT_ROOT_ENV) or os.getcwd()
    _no_nul("output_root", value)
    return Path(os.path.abspath(os.path.expanduser(value)))


def confined(key: str, value: str, root: str | None = None) -> Path:
    """``value`` (of config key ``key``) as an absolute path inside the output root.

    Raises :class:`UserError` naming ``key``, the path and the root, and saying how to allow it.
    """
    _no_nul(key, value)
    base = output_root(root)
    path = Path(os.path.abspath(os.path.expanduser(value)))
    if path != base and base not in path.parents:
        raise UserError(
            f"{key}={value} is outside the output root {base}; write under it, or allow another root "
            f"with output_root=<folder> (or {OUTPUT_ROOT_ENV}=<folder>)"
        )
    return path


def _no_nul(key: str, value: str) -> None:
    if "\x00" in value:
        raise UserError(f"{key} contains a NUL byte: {value!r}")


def confine_override_paths(argv: list[str], keys: tuple[str, ...]) -> None:
    """Raise :class:`UserError` when a ``key=value`` override in ``argv`` for one of ``keys`` lies outside
    the output root (``output_root=`` among the overrides, else the default root)."""
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("output_root=")), None)
    for arg in argv:
        key, _, value = arg.partition("=")
        value = value.strip("'\"")  # Lightning's DDP launcher passes hydra.run.dir="<folder>"
        if key.lstrip("+") in keys and value and "${" not in value:
            confined(key.lstrip("+"), value, root)
