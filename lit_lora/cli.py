"""The one entry pattern of every command: ``lit-lora <command> [overrides]`` and
``python -m lit_lora.<command> [overrides]``.

Before Hydra starts (it creates its run folder before any job code runs), the overrides go through the
same checks for every command: a user config folder (``--config-dir``) must exist, a key that moved is
named with its new place, and an output path must lie inside the output root. Then Hydra composes
``conf/<command>.yaml`` and the command's ``task(cfg)`` runs. A user mistake ends with one line on stderr
(``lit-lora: error: ...``) and its exit status (:mod:`lit_lora.errors`); anything else is a bug in
lit-lora and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from lit_lora import __version__
from lit_lora.config.commands import COMMANDS, CONF_DIR, Command, check_overrides
from lit_lora.console import one_console_line_per_message
from lit_lora.errors import UserError, exit_with


def usage() -> str:
    """``lit-lora --help``: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lit-lora <command> [key=value ...]",
        "",
        "LoRA and QLoRA fine-tuning of causal language models on Lightning, PEFT and Hydra.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()),
        "",
        "'lit-lora <command> --help' shows a command's config groups and options;",
        "'python -m lit_lora.<command>' is the same command.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lit-lora`` console command: ``argv`` (default ``sys.argv[1:]``) is ``<command> [args]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] == "--version":
        print(f"lit-lora {__version__}")
        sys.exit(0)
    name, rest = args[0], args[1:]
    # As under `python -m`: modules in the working directory (a user's own callback or data module named
    # by a `_target_`) import, and the two forms of a command run the same configs.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if name not in COMMANDS:
        print(f"lit-lora: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    run_command(name, rest)


def run_command(name: str, argv: Sequence[str] | None = None) -> None:
    """Run command ``name`` on ``argv`` (default ``sys.argv[1:]``): the checks, Hydra, the task."""
    command = COMMANDS[name]
    args = list(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(command.module)
    if command.config is None:
        module.main(args)
        return
    try:
        if hasattr(module, "prepare_argv"):
            args = module.prepare_argv(args)
        check_overrides(command, args)
    except UserError as err:
        exit_with(err)
    _relaunch_as(command)
    sys.argv = [sys.argv[0], *args]
    _hydra_main(command, module.task)()


def _relaunch_as(command: Command) -> None:
    """Make Lightning's DDP launcher start the other ranks as ``python -m lit_lora.<command>``.

    The launcher rebuilds this process's command line from ``__main__.__spec__``; under the console
    script that spec is None and it would run ``python <path of lit-lora> <overrides>``, without the
    command name. The ``python -m`` form runs the very same code.
    """
    import __main__

    if getattr(__main__, "__spec__", None) is None:
        __main__.__spec__ = importlib.util.find_spec(f"lit_lora.{command.name}")


def _hydra_main(command: Command, task):
    """Hydra's ``main`` around ``task`` for ``conf/<command.config>.yaml`` (absolute path: found from any
    working directory and in an installed wheel)."""
    import hydra

    from lit_lora.config.apps import register_app_configs

    register_app_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=command.config)
    def entry(cfg):
        one_console_line_per_message()
        try:
            return task(cfg)
        except UserError as err:
            exit_with(err)

    return entry
