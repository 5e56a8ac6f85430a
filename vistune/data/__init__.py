"""Data: the in-memory record, readers (LLaVA JSON/JSONL, pairs, ImageFolder), images, validation."""
