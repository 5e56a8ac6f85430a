"""Inference: batched generation, the chat session, embeddings and zero-shot classification."""
