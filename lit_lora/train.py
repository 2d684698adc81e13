"""``python -m lit_lora.train [overrides]``: the same as ``lit-lora train`` (:mod:`lit_lora.cli`).

For scripts and notebooks: ``from lit_lora import train; summary = train.run(["model=tiny"])``, or
``train.train(cfg)`` on a composed config (:mod:`lit_lora.training.run`).
"""

from lit_lora.training.run import run, train

__all__ = ["run", "train"]

if __name__ == "__main__":
    from lit_lora.cli import run_command

    run_command("train")
