"""``python -m lit_lora.generate``: the same as ``lit-lora generate`` (:mod:`lit_lora.cli`); the code is in
:mod:`lit_lora.apps.generate`."""

from lit_lora.apps.generate import Session, chat, run

__all__ = ["Session", "chat", "run"]

if __name__ == "__main__":
    from lit_lora.cli import run_command

    run_command("generate")
