"""Training: the run (``run``), the LightningModule (``module``), objectives and the DPO reference,
strategies, checkpoints, signals (``graceful``), process groups (``distributed``) and sweeps."""
