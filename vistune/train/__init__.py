"""Training: one loop for every stage kind, the objectives, the data order, checkpoints and run logs."""
