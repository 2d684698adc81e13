"""``python -m lit_lora.serve``: the same as ``lit-lora serve`` (:mod:`lit_lora.cli`)."""

from lit_lora.cli import run_command

run_command("serve")
