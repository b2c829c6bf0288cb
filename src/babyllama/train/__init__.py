"""Training: the one loop every stage shares, optimizer and schedule, checkpoints, runtime choices."""
