"""The commands as Python functions, for notebooks and scripts::

    from lit_lora import train
    summary = train.run(["model=tiny", "lora.r=4", "trainer.max_steps=20"])

:func:`compose` builds exactly the configuration ``python -m lit_lora.<command> <overrides>`` would:
the same files under ``conf/``, the same schema and checks, and for training the same run folder
(``hydra.run.dir``: ``<output_root>/runs/<date>/<time>`` unless ``output_dir=`` is given). A user
mistake raises :class:`~lit_lora.errors.UserError` whose message is the line the command line prints
after ``lit-lora: error:``; nothing exits the interpreter. Sweeps (``-m``) stay on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lit_lora.config.apps import register_app_configs
from lit_lora.config.commands import COMMANDS, CONF_DIR, check_overrides
from lit_lora.errors import UserError

# What Hydra would have put in output_dir on the command line (conf/train.yaml).
_RUNTIME_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def compose(command: str, overrides: Sequence[str]) -> DictConfig:
    """The composed config of ``python -m lit_lora.<command> <overrides>``; raises :class:`UserError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if isinstance(overrides, str):
        raise UserError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    overrides = [str(o) for o in overrides]
    check_overrides(COMMANDS[command], overrides)
    register_app_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=command, overrides=overrides, return_hydra_config=True)
        except HydraException as err:  # unknown key or group option, malformed override
            raise UserError(str(err).strip().splitlines()[0]) from err
        run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir")).absolute()
    with open_dict(cfg):
        if command == "train" and OmegaConf.to_container(cfg)["output_dir"] == _RUNTIME_OUTPUT_DIR:
            cfg.output_dir = str(run_dir)
        del cfg["hydra"]
    return cfg
