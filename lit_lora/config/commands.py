"""The command table: every ``lit-lora <command>``, its config file and the keys it confines.

This is the one place that lists the commands. :mod:`lit_lora.cli` runs them (the console command
``lit-lora`` and ``python -m lit_lora.<command>``), :func:`lit_lora.config.compose.compose` builds their
configs for Python callers, and both read the same :attr:`Command.path_keys`.

The configs live in the repository's top-level ``conf/``; a built wheel carries the same files as
``lit_lora/conf`` (``pyproject.toml``), so :data:`CONF_DIR` is the installed copy when there is one and
the checkout's folder otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit_lora.config.moved_keys import check_not_moved
from lit_lora.errors import UserError
from lit_lora.paths import confine_override_paths

_PACKAGE = Path(__file__).resolve().parents[1]
# A wheel install holds lit_lora/conf; an editable install or a checkout reads the source folder.
CONF_DIR = str(
    _PACKAGE / "conf" if (_PACKAGE / "conf" / "train.yaml").is_file() else _PACKAGE.parent / "conf"
)

_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


@dataclass(frozen=True)
class Command:
    """One command of ``lit-lora``.

    ``module`` holds the implementation: for a Hydra command (``config`` set) a ``task(cfg)`` function
    that runs the composed config (and optionally ``prepare_argv(argv) -> argv``, applied to the
    overrides before anything else); for a plain one (``config`` None) a ``main(argv)`` function.
    ``path_keys`` are the override keys whose values must lie inside the output root
    (:mod:`lit_lora.paths`), checked before Hydra creates any folder.
    """

    name: str
    summary: str
    module: str
    config: str | None
    path_keys: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "fine-tune a causal LM with LoRA / QLoRA (SFT, DPO, IPO, SimPO, ORPO); -m for sweeps",
            "lit_lora.training.run",
            "train",
            ("hydra.run.dir", "hydra.sweep.dir"),
        ),
        Command(
            "evaluate",
            "perplexity and task metrics of the base and of adapters on a data split",
            "lit_lora.apps.evaluate",
            "evaluate",
            ("work_dir", "hydra.run.dir"),
        ),
        Command(
            "generate",
            "answer one prompt, or chat, with the base plus an optional adapter",
            "lit_lora.apps.generate",
            "generate",
        ),
        Command(
            "merge",
            "merge an adapter into its base: a plain Hugging Face model folder",
            "lit_lora.apps.merge",
            "merge",
            ("output_dir",),
        ),
        Command(
            "export",
            "export an adapter (merged or alone) to GGUF for llama.cpp / Ollama, with a parity gate",
            "lit_lora.export.exporter",
            "export",
            ("output_dir",),
        ),
        Command(
            "serve",
            "an OpenAI-compatible server for the base and several adapters at once",
            "lit_lora.serve.server",
            "serve",
        ),
        Command(
            "compare",
            "compare run folders or a sweep: a table (markdown, CSV) and plots",
            "lit_lora.apps.compare",
            None,
        ),
    )
}


def check_overrides(command: Command, args: Sequence[str]) -> None:
    """The checks every command makes on its arguments before Hydra runs; raises :class:`UserError`."""
    check_config_dir(args)
    for arg in args:
        if not arg.startswith("-"):
            check_not_moved(arg.partition("=")[0].lstrip("+~"))
    confine_override_paths(list(args), command.path_keys)


def check_config_dir(args: Sequence[str]) -> None:
    """A user config folder (Hydra's ``--config-dir <folder>``, ``-cd <folder>``, ``--config-dir=<folder>``)
    must exist: Hydra itself would ignore a missing one and run with the built-in configs."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in _CONFIG_DIR_FLAGS:
            continue
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"{flag} needs a folder")
            value = args[i + 1]
        if not os.path.isdir(os.path.expanduser(value)):
            raise UserError(f"{flag} {value}: no such folder")
