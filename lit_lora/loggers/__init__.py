"""Loggers lit-lora builds for Lightning: the run's CSV metrics and W&B."""
