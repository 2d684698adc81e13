"""Export to GGUF (``exporter``: the command and its parity gate; ``gguf_files``: the writer;
``modelfile``: Ollama's Modelfile; ``llama_cpp_runtime``: llama.cpp in the gate)."""
