"""``python -m lit_lora.compare``: the same as ``lit-lora compare`` (:mod:`lit_lora.cli`); the code is in
:mod:`lit_lora.apps.compare`."""

from lit_lora.apps.compare import compare

__all__ = ["compare"]

if __name__ == "__main__":
    from lit_lora.cli import run_command

    run_command("compare")
