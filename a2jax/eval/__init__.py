"""Evaluation of generated videos: synthetic E2V fidelity (`fidelity`) and A2-Bench-style CLIP metrics
(`bench`); `python -m a2jax.eval`."""
