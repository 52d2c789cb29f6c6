"""Training plumbing shared by the stages: packing, optimizer, train-state checkpoints, metrics."""
