"""Training data: TFDS triplet builder, grain pipelines, offline encoding, encoded records.

Submodules are imported on use (`from a2jax.data import encoded`): tensorflow-datasets is slow to
import and only the raw-triplet path needs it.
"""
