"""``python -m lit_lora.evaluate``: the same as ``lit-lora evaluate`` (:mod:`lit_lora.cli`); the code is in
:mod:`lit_lora.apps.evaluate`."""

from lit_lora.apps.evaluate import evaluate, run

__all__ = ["evaluate", "run"]

if __name__ == "__main__":
    from lit_lora.cli import run_command

    run_command("evaluate")
