"""Interop: export to and import from the transformers LLaVA format, with a logit-parity check."""
