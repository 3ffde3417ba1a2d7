"""The experiment library: models (one encoder, heads), tasks (data, metrics) and training (loop, checkpoints)."""
