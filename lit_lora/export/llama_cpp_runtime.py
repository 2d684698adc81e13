"""llama.cpp as an optional runtime (``make llamacpp`` or ``pip install 'lit-lora[llamacpp]'``, which build
llama-cpp-python from source): greedy answers from a GGUF file, optionally with a LoRA GGUF, for the
export's parity gate (:mod:`lit_lora.export.exporter`)."""

from __future__ import annotations

import os
from pathlib import Path

from lit_lora.progress import progress


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def greedy_answers(
    model: Path,
    lora: Path | None,
    prompts: list[str],
    max_new_tokens: int,
    n_ctx: int,
) -> list[str]:
    """llama.cpp's greedy answer to each prompt text (training's rendering of a conversation, generation
    prompt included). llama.cpp tokenizes the text itself from the GGUF vocabulary (special tokens
    parsed, BOS added where the file says so), so the tokenizer written into the file is checked too."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=n_ctx,
        n_threads=os.cpu_count() or 1,
        seed=0,
        verbose=False,
    )
    answers = []
    for text in progress(prompts, len(prompts), "llama.cpp answers", unit="rows"):
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        out = llm.create_completion(
            tokens, max_tokens=max_new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0
        )
        answers.append(out["choices"][0]["text"])
    llm.close()  # frees the model now, not at garbage collection
    return answers
