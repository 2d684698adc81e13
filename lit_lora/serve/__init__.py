"""The OpenAI-compatible server: HTTP app (``server``), batching engine (``engine``), request and
response shapes (``protocol``)."""
