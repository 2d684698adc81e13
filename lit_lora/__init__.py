"""lit-lora: LoRA and QLoRA fine-tuning of causal language models on Lightning, PEFT and Hydra."""

import os

from lit_lora import console

# Quiet, offline-friendly defaults set before transformers / tokenizers import; the user's env wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Known-harmless third-party messages, silenced by exact text before those libraries import (the list
# and the reasons: lit_lora/console.py; verbose=true shows everything).
console.install()

__version__ = "0.1.0"
