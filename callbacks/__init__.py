"""lit-lora's plugin callbacks, one module each, each enabled by a YAML in ``conf/callbacks/``.

A callback may expose ``summary_metrics() -> dict``: the training entry point merges what it
returns into the run's ``summary.json``.
"""
