"""``python -m lit_lora.export``: the same as ``lit-lora export`` (:mod:`lit_lora.cli`)."""

from lit_lora.cli import run_command

run_command("export")
