"""Flow-matching training of the A2 transformer: loss, optimizer, state, sharded step, checkpoints,
metrics. The entry point is train.py at the repository root."""
