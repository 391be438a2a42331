"""The `xla` attention backend against torch's scaled_dot_product_attention: on the CPU it runs its
chunked, heads-major form (`attention._xla_cpu`), elsewhere the plain one (`_xla_plain`); both
must give the reference's numbers, with and without a logit bias and a key mask, also when the
queries do not split into chunks evenly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from a2jax import attention

F32_TOL = 1e-5   # max|Δ| ≤ F32_TOL · max|ref|
BF16_TOL = 1e-2  # relative L2 of bfloat16 operands vs the float32 reference


def reference(q, k, v, bias, kv_mask):
  """torch SDPA, (B, S, H, D) layout in and out, float32."""
  tq, tk, tv = (torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2) for x in (q, k, v))
  mask = None
  if bias is not None or kv_mask is not None:
    mask = torch.zeros(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if bias is not None:
      mask = mask + torch.from_numpy(bias)
    if kv_mask is not None:
      mask = mask.masked_fill(~torch.from_numpy(kv_mask)[:, None, None, :], float("-inf"))
  out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
  return out.transpose(1, 2).numpy()


def inputs(s, length, with_bias, with_mask, seed=0):
  rng = np.random.default_rng(seed)
  b, h, d = 2, 3, 16
  q = rng.standard_normal((b, s, h, d)).astype(np.float32)
  k, v = (rng.standard_normal((b, length, h, d)).astype(np.float32) for _ in range(2))
  bias = rng.standard_normal((1, h, s, length)).astype(np.float32) if with_bias else None
  kv_mask = None
  if with_mask:
    kv_mask = np.ones((b, length), bool)
    kv_mask[1, length // 3:] = False  # row 1 sees a third of its keys
  return q, k, v, bias, kv_mask


# 601 queries: 3 chunks of 201 rows (2 padded); 100: one chunk; keys self-sized and cross-sized.
@pytest.mark.parametrize("s,length,with_bias,with_mask", [
    (601, 601, False, False), (601, 77, True, True), (100, 100, True, False), (520, 40, False, True)])
def test_xla_matches_sdpa_float32(s, length, with_bias, with_mask):
  q, k, v, bias, kv_mask = inputs(s, length, with_bias, with_mask)
  want = reference(q, k, v, bias, kv_mask)
  scale = 1.0 / np.sqrt(q.shape[-1])
  for name, fn in (("cpu form", attention._xla_cpu), ("plain form", attention._xla_plain)):
    got = np.asarray(jax.jit(lambda *a: fn(*a, scale=scale, bias=bias, kv_mask=kv_mask))(q, k, v))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= F32_TOL, (name, err)
  got = np.asarray(jax.jit(lambda *a: attention.attention(*a, bias=bias, kv_mask=kv_mask))(q, k, v))
  assert np.abs(got - want).max() / np.abs(want).max() <= F32_TOL


def test_xla_bfloat16_and_chunked_gradient():
  q, k, v, bias, kv_mask = inputs(601, 601, True, True, seed=1)
  want = reference(q, k, v, bias, kv_mask)
  got = attention.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), bias=bias,
                            kv_mask=kv_mask)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float32)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= BF16_TOL

  # Training differentiates through the chunk loop: its gradients equal the plain form's.
  scale = 1.0 / np.sqrt(q.shape[-1])
  loss = lambda fn: jax.grad(lambda q, k, v: jnp.sum(
      fn(q, k, v, scale=scale, bias=bias, kv_mask=kv_mask) ** 2), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(jax.jit(lambda: loss(attention._xla_cpu))(),
                       jax.jit(lambda: loss(attention._xla_plain))()):
    assert np.abs(got - want).max() <= F32_TOL * np.abs(want).max()


@pytest.mark.parametrize("block,with_mask", [(50, False), (100, True), (300, False)])
def test_block_causal_matches_sdpa_with_a_dense_block_mask(block, with_mask):
  """Diffusion forcing's block-causal self-attention: query block i sees key blocks 0..i. The
  dispatch runs each query block on its key prefix; the reference masks the full logits."""
  q, k, v, _, kv_mask = inputs(300, 300, False, with_mask, seed=2)
  blocks = np.arange(300) // block
  allowed = blocks[None, :] <= blocks[:, None]  # (S, L)
  mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)[None, None]
  want = reference(q, k, v, np.broadcast_to(mask, (1, 3, 300, 300)).copy(), kv_mask)
  run = jax.jit(lambda *a: attention.attention(*a, kv_mask=kv_mask, causal_block=block))
  got = np.asarray(run(q, k, v))
  assert np.abs(got - want).max() / np.abs(want).max() <= F32_TOL
  if block < 300:  # a later block's values change nothing before it
    v2 = v.copy()
    v2[:, block:] += 1.0
    np.testing.assert_array_equal(np.asarray(run(q, k, v2))[:, :block], got[:, :block])
