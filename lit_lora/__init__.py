"""lit-lora: LoRA and QLoRA fine-tuning of causal language models on Lightning, PEFT and Hydra."""

import logging
import os

# Quiet, offline-friendly defaults set before transformers / tokenizers import; the user's env wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# bitsandbytes >= 0.50 tries to fetch an optimised CPU 4-bit kernel from the hub at import and logs a
# warning when it cannot (always, offline); it then uses its own CPU kernel, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
