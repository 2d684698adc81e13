"""What lit-lora lets third-party libraries print: the one place where known-harmless messages are
silenced, each by its exact text and the module that emits it, with the reason.

Nothing else is hidden: a warning lit-lora cannot explain still shows. ``verbose=true`` on the command
line (or ``LIT_LORA_VERBOSE=1``) installs none of this, so everything shows. The README's "Console"
section lists what remains and what each message means; ``tests/test_console.py`` fails on a warning
of a short run that the section does not list.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "LIT_LORA_VERBOSE"


@dataclass(frozen=True)
class Known:
    """A third-party warning known to be harmless here: ``message`` and ``module`` are regular
    expressions matched as :func:`warnings.filterwarnings` does (from the start)."""

    message: str
    module: str
    category: type[Warning]
    why: str


KNOWN_WARNINGS = (
    Known(
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        FutureWarning,
        "PEFT 0.21's PeftModel reads transformers' old property name; the value is the same.",
    ),
    Known(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.pytorch\.utilities\._pytree",
        FutureWarning,
        "Lightning 2.6 flattens batches with torch's old LeafSpec; torch 2.13 still supports it.",
    ),
    Known(
        r"The '\w+_dataloader' does not have many workers",
        r"lightning\.pytorch\.trainer\.connectors\.data_connector",
        UserWarning,
        "Tokenized rows are already in memory; worker processes would only copy them.",
    ),
)

# Log records (not warnings) from named loggers: (logger name, message start, why).
KNOWN_LOG_LINES = (
    (
        "lightning.pytorch.utilities.rank_zero",
        "💡 Tip: For seamless cloud logging",
        "Lightning's advertisement for its hosted logger, printed by every Trainer.",
    ),
    (
        "lightning.fabric.utilities.rank_zero",
        "💡 Tip: For seamless cloud logging",
        "The same advertisement, when Lightning's fabric module owns the rank-zero logger.",
    ),
)
# bitsandbytes >= 0.50 tries to fetch an optimised CPU 4-bit kernel from the hub at import and logs a
# warning when it cannot (always, offline); it then uses its own CPU kernel, so the warning is noise.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


class _DropStart(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """``verbose=true`` among the command-line overrides, or ``LIT_LORA_VERBOSE=1``."""
    argv = sys.argv[1:] if argv is None else argv
    flags = {a.lstrip("+").lower() for a in argv}
    return bool({"verbose=true", "verbose=1"} & flags) or os.environ.get(VERBOSE_ENV, "") in ("1", "true")


def install() -> bool:
    """Silence exactly :data:`KNOWN_WARNINGS`, :data:`KNOWN_LOG_LINES` and :data:`QUIET_LOGGERS`, unless
    verbose output was asked for; idempotent. Returns whether anything was installed."""
    if verbose_requested():
        return False
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", known.message, known.category, known.module)
    for name, start, _why in KNOWN_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStart) and f.start == start for f in logger.filters):
            logger.addFilter(_DropStart(start))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


class _NotFrom(logging.Filter):
    """Drops the records of one logger family (``name`` and its children)."""

    def __init__(self, name: str):
        super().__init__()
        self.family = name

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == self.family or record.name.startswith(self.family + "."))


def one_console_line_per_message() -> None:
    """Lightning prints its records through a console handler of its own (``INFO: ...``) and also passes
    them to the root logger, whose console handler Hydra configured: every Lightning line appeared twice.
    The root's console handlers skip Lightning's records (Lightning's own handler prints them once); the
    run's log file still gets them. Call after Hydra has configured logging; idempotent."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _NotFrom) for f in handler.filters):
            handler.addFilter(_NotFrom("lightning"))


def quiet_library_progress_bars() -> None:
    """Outside a terminal, transformers' "Loading weights" and datasets' "Saving the dataset" bars only
    add carriage-return noise to a log; lit-lora's own progress lines (:mod:`lit_lora.progress`) stay."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
