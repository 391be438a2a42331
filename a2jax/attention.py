"""The one attention dispatch: `xla` (any backend), `cudnn` (GPU flash attention), `splash` (TPU
Pallas kernel under `shard_map`), with Ulysses context parallelism over the `context` mesh axis.

All backends take q (B, S, H, D) and k, v (B, L, H, D) and return (B, S, H, D) in q's dtype; the
softmax statistics are float32. Device-specific code lives here and nowhere else.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from a2jax import sharding
from a2jax.errors import InputError

BACKENDS = ("xla", "cudnn", "splash")
SPLASH_BLOCK_Q = 512
SPLASH_BLOCK_KV_SELF = 512
SPLASH_BLOCK_KV_CROSS = 128
CPU_QUERY_CHUNK = 256  # query rows per step of the CPU form of `xla` (see _xla_cpu)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla",
              bias: jax.Array | None = None, kv_mask: jax.Array | None = None,
              scale: float | None = None, causal_block: int | None = None) -> jax.Array:
  """Scaled dot-product attention, q (B, S, H, D), k/v (B, L, H, D) → (B, S, H, D).

  bias: float (B|1, H, S, L) added to the logits (umT5's relative positions); kv_mask: bool (B, L),
  False keys are ignored. scale defaults to 1/√D. On a mesh with `context` > 1, the token-sharded
  inputs are re-sharded to head-sharded (Ulysses: one all-to-all each way).

  causal_block: block-causal self-attention (diffusion forcing): the S = L tokens form blocks of
  `causal_block` tokens and a query sees the keys of its own block and of every earlier block.
  Query block i runs the backend on the key prefix of blocks 0..i, so no backend ever sees a mask,
  none is materialised, and the masked half of the logits is never computed.
  """
  if backend not in BACKENDS:
    raise InputError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  ulysses = ("batch", "attn_tokens", "attn_heads", "act_kv")
  q, k, v = (sharding.constrain(x, ulysses) for x in (q, k, v))
  run = functools.partial(_backend, backend=backend, scale=scale)
  if causal_block is None or causal_block >= q.shape[1]:
    out = run(q, k, v, bias, kv_mask)
  else:
    if q.shape[1] != k.shape[1] or q.shape[1] % causal_block:
      raise InputError(f"block-causal attention needs as many queries as keys in whole blocks: "
                       f"{q.shape[1]} queries, {k.shape[1]} keys, blocks of {causal_block}")
    # Each slice is along the token axis, which is whole on every device inside attention.
    blocks = []
    for end in range(causal_block, q.shape[1] + 1, causal_block):
      rows = slice(end - causal_block, end)
      blocks.append(run(q[:, rows], k[:, :end], v[:, :end],
                        None if bias is None else bias[:, :, rows, :end],
                        None if kv_mask is None else kv_mask[:, :end]))
    out = jnp.concatenate(blocks, axis=1)
  return sharding.constrain(out, ulysses)


def _backend(q, k, v, bias, kv_mask, *, backend, scale):
  """One unmasked-by-position call of `backend`: q (B, S, H, D), k/v (B, L, H, D) → q's shape."""
  if backend == "splash":
    if bias is not None or kv_mask is not None:
      raise InputError("the splash backend takes no bias or key mask here: use attention='xla'")
    return _splash(q, k, v, scale)
  if backend == "cudnn":
    if bias is not None:
      raise InputError("the cudnn backend takes no logit bias here: use attention='xla'")
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  return _xla(q, k, v, scale, bias, kv_mask)


def _xla(q, k, v, scale, bias, kv_mask):
  """Plain XLA attention: bf16/f32 matmuls with float32 logits and softmax. The CPU gets its own
  form (`_xla_cpu`), chosen when the program is lowered: an ahead-of-time compile for a TPU or a
  GPU from this CPU gets the plain one."""
  return jax.lax.platform_dependent(
      q, k, v, cpu=functools.partial(_xla_cpu, scale=scale, bias=bias, kv_mask=kv_mask),
      default=functools.partial(_xla_plain, scale=scale, bias=bias, kv_mask=kv_mask))


def _xla_plain(q, k, v, *, scale, bias, kv_mask):
  logits = jnp.einsum("bshd,blhd->bhsl", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if kv_mask is not None:
    logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhsl,blhd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _xla_cpu(q, k, v, *, scale, bias, kv_mask):
  """The plain attention's arithmetic arranged for XLA:CPU (same float32 logits and softmax).

  - Heads-major (B, H, S, D) operands: with (B, S, H, D) ones XLA:CPU transposes the whole
    (H, S, L) probability matrix before the value product (a copy as large as the logits).
  - The softmax is normalised after the value product, on (S, D) instead of (S, L).
  - Queries run in a loop of chunks of about CPU_QUERY_CHUNK rows, so that each chunk's logits
    stay in the cache between the two products instead of streaming S × L × H floats through
    memory; each query's softmax still spans all keys, so chunking changes no arithmetic.
  Measured on a 2-core AVX2 machine, 1,950 queries onto 1,950 keys, 12 heads × 128: 0.55 s of CPU
  time against the plain form's 1.0 s (chunks of 128 to 256 rows alike; 390 rows: 0.8 s).
  """
  b, s, h, d = q.shape
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, H, ·, D)
  chunks = -(-s // CPU_QUERY_CHUNK)
  rows = -(-s // chunks)  # chunks of equal size: at most `chunks` − 1 padded query rows

  def chunk_attention(qc, bias_c):
    """qc (B, H, rows, D), bias_c (B|1, H, rows, L) | None → (B, H, rows, D) float32."""
    logits = jnp.einsum("bhsd,bhld->bhsl", qc, kt, preferred_element_type=jnp.float32) * scale
    if bias_c is not None:
      logits = logits + bias_c.astype(jnp.float32)
    if kv_mask is not None:
      logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("bhsl,bhld->bhsd", e.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    return out / jnp.sum(e, axis=-1, keepdims=True)

  if chunks == 1:
    out = chunk_attention(qt, bias)
  else:
    pad = ((0, 0), (0, 0), (0, chunks * rows - s), (0, 0))
    split = lambda x: jnp.moveaxis(jnp.pad(x, pad).reshape(*x.shape[:2], chunks, rows, x.shape[3]),
                                   2, 0)  # (chunks, ·, H, rows, ·)
    out = jax.lax.map(lambda a: chunk_attention(*a),
                      (split(qt), None if bias is None else split(bias)))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, chunks * rows, d)[:, :, :s]
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _splash(q, k, v, scale):
  """TPU Pallas splash attention under shard_map: batch over data/fsdp, heads over context/tensor.

  The kernel wants (H, S, D) per example with S a multiple of its blocks: q is padded to a multiple
  of 512, the keys to a multiple of 512 (self) or 128 (cross); padded keys get segment id 1 and are
  masked, padded queries attend the real keys and are sliced away.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mesh = jax.sharding.get_abstract_mesh()
  b, s, h, d = q.shape
  length = k.shape[1]
  block_kv = SPLASH_BLOCK_KV_SELF if length == s else SPLASH_BLOCK_KV_CROSS
  s_pad, l_pad = _round_up(s, SPLASH_BLOCK_Q), _round_up(length, block_kv)
  # (B, H, S, D) layout, q pre-scaled so the kernel's unscaled logits equal the reference's.
  qt = jnp.pad(jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2),
               ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
  kt = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, l_pad - length), (0, 0)))
  vt = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, 0), (0, l_pad - length), (0, 0)))
  q_seg = jnp.zeros((b, s_pad), jnp.int32)
  kv_seg = jnp.broadcast_to((jnp.arange(l_pad) >= length).astype(jnp.int32), (b, l_pad))

  if mesh.empty:
    spec = PartitionSpec()
    local_heads = h
  else:
    spec = sharding.logical_to_spec(("batch", "attn_heads", "attn_tokens", "act_kv"), qt.shape, mesh)
    head_axes = spec[1] if isinstance(spec[1], tuple) else (spec[1],) if spec[1] else ()
    local_heads = h // int(np.prod([dict(mesh.shape)[a] for a in head_axes]))
  # The backward blocks (dq computed inside the fused dk/dv kernel) serve training.
  block_sizes = sk.BlockSizes(block_q=SPLASH_BLOCK_Q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=SPLASH_BLOCK_Q, block_kv_dkv=block_kv,
                              block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=True)
  kernel = sk.make_splash_mha(
      sm.MultiHeadMask([sm.FullMask((s_pad, l_pad))] * local_heads),
      block_sizes=block_sizes, head_shards=1, q_seq_shards=1)

  def one_example(qe, ke, ve, q_seg_e, kv_seg_e):  # (H, S, D) each
    return kernel(qe, ke, ve, segment_ids=sk.SegmentIds(q=q_seg_e, kv=kv_seg_e))

  local = jax.vmap(one_example)

  if mesh.empty:
    out = local(qt, kt, vt, q_seg, kv_seg)
  else:
    seg_spec = PartitionSpec(spec[0], None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                        out_specs=spec, check_vma=False)(qt, kt, vt, q_seg, kv_seg)
  return jnp.swapaxes(out[:, :, :s], 1, 2).astype(q.dtype)

