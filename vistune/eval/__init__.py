"""Evaluation: metrics, benchmark loaders, tasks, reports, retrieval and the text-retention set."""
