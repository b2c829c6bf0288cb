"""Export: our checkpoints as stock formats other tools load."""
