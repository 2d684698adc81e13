"""Models: the one model builder (``builder``), adapter folders (``adapters``) and the embedded default
model (``embedded``)."""
