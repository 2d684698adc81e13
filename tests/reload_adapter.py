"""Run in a fresh process by the tests: plain transformers + PEFT, nothing from lit-lora.

Usage: python tests/reload_adapter.py BASE_FOLDER ADAPTER_FOLDER INPUT_IDS.safetensors OUT.safetensors
Loads BASE in fp32, applies the adapter with PeftModel.from_pretrained and writes the logits.
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, inputs_file, out_file = sys.argv[1:5]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
inputs = load_file(inputs_file)
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
save_file({"logits": logits.contiguous()}, out_file)
