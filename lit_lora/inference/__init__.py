"""Inference: the one decoding core (``decoding``) and scoring of answers (``scoring``)."""
