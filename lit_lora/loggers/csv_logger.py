"""Lightning's CSV logger for the run folder, which never replaces a file it did not write.

Lightning's writer warns that "previous log files in this directory will be deleted" whenever its
folder is not empty, and the run folder never is (``config.yaml``, ``data/`` come first). What it
would replace is only its own ``metrics.csv`` and ``hparams.yaml``: a fresh run folder holds neither
(``lit_lora.training.run`` refuses a folder with results), and on resume ``lit_lora.training.run`` renames the
interrupted run's copies first (``metrics.until-step-N.csv``). :class:`RunCSVLogger` checks exactly
that instead, and refuses to start rather than overwrite.
"""

from __future__ import annotations

import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lit_lora.errors import UserError

OWN_FILES = (ExperimentWriter.NAME_METRICS_FILE, ExperimentWriter.NAME_HPARAMS_FILE)


class _RunFolderWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        for name in OWN_FILES:
            path = os.path.join(self.log_dir, name)
            if self._fs.exists(path):
                raise UserError(f"{path} exists from an earlier run; lit-lora never overwrites it")


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``metrics.csv`` and ``hparams.yaml`` into ``save_dir``; same arguments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunFolderWriter(log_dir=self.log_dir)
        return self._experiment
