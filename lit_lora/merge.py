"""``python -m lit_lora.merge``: the same as ``lit-lora merge`` (:mod:`lit_lora.cli`); the code is in
:mod:`lit_lora.apps.merge`."""

from lit_lora.apps.merge import merge, run

__all__ = ["merge", "run"]

if __name__ == "__main__":
    from lit_lora.cli import run_command

    run_command("merge")
