"""vistune: visual instruction tuning, from a 2-core laptop to many GPUs."""

__version__ = "0.1.0"
