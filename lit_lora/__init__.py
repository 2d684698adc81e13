"""lit-lora: LoRA and QLoRA fine-tuning of causal language models on Lightning, PEFT and Hydra."""

import os

# Quiet, offline-friendly defaults set before transformers / tokenizers import; the user's env wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
