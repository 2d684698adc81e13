"""The commands that read a run folder after training: merge, generate, evaluate, compare. They share
the config, data, models and inference wings and never import one another."""
