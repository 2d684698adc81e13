"""Data: reading rows from files, globs and datasets (``rows``), chat rendering (``rendering``), tokens,
masks and batches (``batching``), the Lightning data module (``module``) and the built-in tasks (``demo``)."""
