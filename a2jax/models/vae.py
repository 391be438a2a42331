"""WanVAE: the Wan 2.1 causal video VAE (diffusers `AutoencoderKLWan`, is_residual False), channels-last.

Video (B, F, H, W, 3) in [−1, 1] ↔ latents (B, f, H/8, W/8, z_dim) with f = (F − 1)/4 + 1.

Streaming, as the reference computes it: the encoder sees frame 0, then 4 frames per chunk; the
decoder sees 1 latent frame per chunk. Every causal conv keeps the last 2 frames of its input in a
functional cache (a pytree returned by each module and passed back in on the next chunk); the chunk
loop after the first chunk is one `nn.scan`, so compile time and memory do not grow with F. The
first chunk is special in the reference and here: the temporal downsample skips its time conv and
caches its input frame; the temporal upsample skips its time conv and frame doubling (diffusers'
'Rep' marker), after which its cache starts as zeros.

Submodules carry the diffusers state-dict names with `_N` for `.N` (`down_blocks_3.resample_1`);
the converter maps them back.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from a2jax import sharding
from a2jax.attention import attention
from a2jax.configs import VAEConfig
from a2jax.errors import InputError
from a2jax.models.layers import dtype_of, partitioned

CACHE_T = 2  # frames a causal 3x3x3 conv needs from the previous chunk
VIDEO_AXES = ("batch", "frames", "height", "width", "channels")
Cache = Any  # pytree of (B, t, H, W, C) arrays; None on the first chunk


def _constrain(x: jax.Array) -> jax.Array:
  return sharding.constrain(x, VIDEO_AXES)


class Conv(nn.Module):
  """N-d convolution, channels-last, kernel (*k, in, out) (= torch (out, in, *k) transposed).

  `padding` is explicit ((lo, hi) per spatial dim; 3D kernels take no time padding, the causal
  cache gives it, see `causal_conv`); the conv runs in `dtype` with float32 accumulation and
  returns `dtype`.
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...] | None = None
  padding: Sequence[tuple[int, int]] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = len(self.kernel_size)
    axes = (None,) * nd + ("conv_in", "conv_out")
    kernel = self.param("kernel", partitioned(nn.initializers.lecun_normal(), axes),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (self.features,),
                      self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = self.strides or (1,) * nd
    padding = self.padding or ((0, 0),) * nd
    if nd == 3:
      # A time-kernel-k 3D conv as the sum of k 2D convs over frames t·s + dt (no time padding
      # here: the causal cache provides it). XLA:CPU runs 2D convs ~3× faster than 3D ones.
      b, t = x.shape[:2]
      st = strides[0]
      t_out = (t - self.kernel_size[0]) // st + 1
      y = 0.0
      for dt in range(self.kernel_size[0]):
        frames = x[:, dt:dt + st * (t_out - 1) + 1:st]
        y = y + self._conv2d(frames.reshape(b * t_out, *x.shape[2:]), kernel[dt], strides[1:],
                             padding[1:])
      y = y.reshape(b, t_out, *y.shape[1:])
    else:
      y = self._conv2d(x, kernel, strides, padding)
    return (y + bias.astype(jnp.float32)).astype(self.dtype)

  @staticmethod
  def _conv2d(x, kernel, strides, padding) -> jax.Array:
    """(N, H, W, Cin) ⊛ (kh, kw, Cin, Cout) → float32 (N, H', W', Cout); 1×1 as a matmul."""
    if kernel.shape[:2] == (1, 1) and tuple(strides) == (1, 1) and tuple(padding) == ((0, 0),) * 2:
      return jnp.einsum("...i,io->...o", x, kernel[0, 0], preferred_element_type=jnp.float32)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=jnp.float32)


def causal_conv(conv: Conv, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """A causal time conv (kernel 3 in time, no time padding in `conv`) over [cache ‖ x].

  x (B, T, H, W, C); cache (B, 2, H, W, C) = the previous chunk's last input frames, zeros (None)
  on the first chunk. Returns (conv output (B, T, H', W', C'), the new cache).
  """
  if cache is None:
    cache = jnp.zeros((x.shape[0], CACHE_T) + x.shape[2:], x.dtype)
  x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
  return conv(x), x[:, -CACHE_T:]


def conv3d(features: int, kernel: int, dtype, param_dtype, name: str | None = None) -> Conv:
  """Wan's causal Conv3d: kernel k³, spatial padding k//2 (time handled by `causal_conv`)."""
  p = kernel // 2
  padding = None if kernel == 1 else ((0, 0), (p, p), (p, p))
  return Conv(features, (kernel,) * 3, padding=padding, dtype=dtype, param_dtype=param_dtype,
              name=name)


class ChannelRMSNorm(nn.Module):
  """WanRMS_norm: x / max(‖x‖₂, 1e-12) over channels · √C · gamma, float32 compute, out `dtype`."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    gamma = self.param("gamma", partitioned(nn.initializers.ones, ("norm",)), (dim,),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(dim) * gamma.astype(jnp.float32)
    return y.astype(self.dtype)


class ResidualBlock(nn.Module):
  """WanResidualBlock: RMS norm → SiLU → causal conv, twice, plus a 1×1×1 conv shortcut when the
  width changes. Cache: (conv1 input frames, conv2 input frames)."""

  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = x if x.shape[-1] == self.out_dim else conv3d(self.out_dim, 1, name="conv_shortcut", **kw)(x)
    c1, c2 = (None, None) if cache is None else cache
    y = nn.silu(ChannelRMSNorm(name="norm1", **kw)(x))
    y, c1 = causal_conv(conv3d(self.out_dim, 3, name="conv1", **kw), y, c1)
    y = nn.silu(ChannelRMSNorm(name="norm2", **kw)(y))
    y, c2 = causal_conv(conv3d(self.out_dim, 3, name="conv2", **kw), y, c2)
    return _constrain(y + h), (c1, c2)


class AttentionBlock(nn.Module):
  """WanAttentionBlock: single-head self-attention over the H·W positions of each frame."""

  backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = ChannelRMSNorm(name="norm", **kw)(x)
    qkv = Conv(3 * c, (1, 1), name="to_qkv", **kw)(y).reshape(b * t, h * w, 1, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)                     # (B·T, H·W, 1, C) each
    y = attention(q, k, v, backend=self.backend).reshape(b, t, h, w, c)
    return x + Conv(c, (1, 1), name="proj", **kw)(y)


class MidBlock(nn.Module):
  """WanMidBlock: resnet, attention, resnet. Cache: (resnets_0, resnets_1)."""

  backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c0, c1 = (None, None) if cache is None else cache
    x, c0 = ResidualBlock(x.shape[-1], name="resnets_0", **kw)(x, c0)
    x = AttentionBlock(self.backend, name="attentions_0", **kw)(x)
    x, c1 = ResidualBlock(x.shape[-1], name="resnets_1", **kw)(x, c1)
    return x, (c0, c1)


class Resample(nn.Module):
  """WanResample: 'downsample2d', 'downsample3d', 'upsample2d', 'upsample3d'.

  Down: zero-pad right/bottom by 1, 3×3 conv stride 2; '3d' then halves time with a (3,1,1)
  stride-2 conv over [last frame of the previous chunk ‖ x] (cache (B, 1, H/2, W/2, C)).
  Up: '3d' first doubles time with a causal (3,1,1) conv to 2C channels (cache (B, 2, H, W, C)),
  then nearest 2× and a 3×3 conv to `out_dim`. `first` marks the first chunk (see module doc).
  """

  mode: str
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    if self.mode == "upsample3d":
      time_conv = Conv(2 * c, (3, 1, 1), name="time_conv", **kw)
      if first:
        cache = jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
      else:
        x, cache = causal_conv(time_conv, x, cache)
        # channels [frame 2i | frame 2i+1] → frames
        x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        t = 2 * t
    x = x.reshape(b * t, *x.shape[2:])
    if self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = Conv(self.out_dim, (3, 3), padding=((1, 1), (1, 1)), name="resample_1", **kw)(x)
    else:
      x = Conv(self.out_dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="resample_1",
               **kw)(x)
    x = _constrain(x.reshape(b, t, *x.shape[1:]))
    if self.mode == "downsample3d":
      time_conv = Conv(x.shape[-1], (3, 1, 1), strides=(2, 1, 1), name="time_conv", **kw)
      last = x[:, -1:]
      if not first:
        x = time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
      cache = last
    return x, (cache if self.mode.endswith("3d") else None)


def _encoder_layout(cfg: VAEConfig) -> list[tuple[str, int]]:
  """Flat `down_blocks` of WanEncoder3d: ("res", out_dim) or (resample mode, dim)."""
  dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
  layout = []
  for i, out_dim in enumerate(dims[1:]):
    layout += [("res", out_dim)] * cfg.num_res_blocks
    if i != len(cfg.dim_mult) - 1:
      layout.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", out_dim))
  return layout


class Encoder3d(nn.Module):
  """WanEncoder3d: video chunk (B, T, H, W, 3) → (B, T', H/8, W/8, 2·z_dim) with T' = 1 for the
  first chunk (T = 1) and T/4 after. Cache: {module name: cache}."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    cache = cache or {}
    new = {}
    x, new["conv_in"] = causal_conv(conv3d(cfg.base_dim, 3, name="conv_in", **kw), x,
                                    cache.get("conv_in"))
    x = _constrain(x)
    for n, (kind, dim) in enumerate(_encoder_layout(cfg)):
      name = f"down_blocks_{n}"
      if kind == "res":
        x, new[name] = ResidualBlock(dim, name=name, **kw)(x, cache.get(name))
      else:
        x, new[name] = Resample(kind, dim, name=name, **kw)(x, cache.get(name), first)
    x, new["mid_block"] = MidBlock(cfg.attention, name="mid_block", **kw)(x, cache.get("mid_block"))
    x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
    x, new["conv_out"] = causal_conv(conv3d(2 * cfg.z_dim, 3, name="conv_out", **kw), x,
                                     cache.get("conv_out"))
    return x, new


class UpBlock(nn.Module):
  """WanUpBlock: num_res_blocks + 1 resnets, then an optional upsampler (to out_dim // 2)."""

  out_dim: int
  num_res_blocks: int
  upsample_mode: str | None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cache = cache or {}
    new = {}
    for j in range(self.num_res_blocks + 1):
      x, new[f"resnets_{j}"] = ResidualBlock(self.out_dim, name=f"resnets_{j}", **kw)(
          x, cache.get(f"resnets_{j}"))
    if self.upsample_mode is not None:
      x, new["upsamplers_0"] = Resample(self.upsample_mode, self.out_dim // 2, name="upsamplers_0",
                                        **kw)(x, cache.get("upsamplers_0"), first)
    return x, new


class Decoder3d(nn.Module):
  """WanDecoder3d: one latent frame (B, 1, h, w, z_dim) → (B, T, 8h, 8w, 3), T = 1 on the first
  chunk and 4 after (with the release's temporal upsampling). Cache: {module name: cache}."""

  cfg: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    cache = cache or {}
    new = {}
    x, new["conv_in"] = causal_conv(conv3d(dims[0], 3, name="conv_in", **kw), x,
                                    cache.get("conv_in"))
    x, new["mid_block"] = MidBlock(cfg.attention, name="mid_block", **kw)(_constrain(x),
                                                                         cache.get("mid_block"))
    for i, out_dim in enumerate(dims[1:]):
      mode = None
      if i != len(cfg.dim_mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      name = f"up_blocks_{i}"
      x, new[name] = UpBlock(out_dim, cfg.num_res_blocks, mode, name=name, **kw)(
          x, cache.get(name), first)
    x = nn.silu(ChannelRMSNorm(name="norm_out", **kw)(x))
    x, new["conv_out"] = causal_conv(conv3d(cfg.out_channels, 3, name="conv_out", **kw), x,
                                     cache.get("conv_out"))
    return x, new


def _scan_chunks(body, module: nn.Module, cache: Cache, chunks: jax.Array, unroll: bool):
  """Runs body(module, cache, chunk) → (cache, out) over chunks (N, ...) → outs (N, ...).

  One `nn.scan` (parameters broadcast), or a Python loop when `unroll` (for tests and debugging).
  """
  if unroll:
    outs = []
    for chunk in chunks:
      cache, out = body(module, cache, chunk)
      outs.append(out)
    return jnp.stack(outs)
  scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
  return scan(module, cache, chunks)[1]


def _encode_chunk(vae: "WanVAE", cache: Cache, chunk: jax.Array):
  out, cache = vae.encoder(chunk, cache, first=False)
  return cache, out


def _decode_chunk(vae: "WanVAE", cache: Cache, frame: jax.Array):
  out, cache = vae.decoder(frame, cache, first=False)
  return cache, out


def _frames_of_chunks(outs: jax.Array) -> jax.Array:
  """(N, B, T, H, W, C) → (B, N·T, H, W, C)."""
  n, b, t = outs.shape[:3]
  return jnp.moveaxis(outs, 0, 1).reshape(b, n * t, *outs.shape[3:])


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """diffusers' blend_v / blend_h: b's first `extent` rows along `axis` ← linear ramp from a's last."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  ramp = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
  head_a = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
  head_b = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
  mixed = (head_a.astype(jnp.float32) * (1 - ramp) + head_b.astype(jnp.float32) * ramp)
  rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
  return jnp.concatenate([mixed.astype(b.dtype), rest], axis=axis)


def _tiled(module: nn.Module, method: str, x: jax.Array, unroll: bool, tile: tuple[int, int],
           stride: tuple[int, int], scale: float, out_size: tuple[int, int]) -> jax.Array:
  """diffusers' tiled_encode / tiled_decode over x (B, T, H, W, C).

  `module.<method>(tile, unroll)` runs on tiles of `tile` at `stride` (input pixels), giving outputs
  `scale`× larger (1/8 for encode, 8 for decode). Tiles of equal shape go through one `nn.scan`
  (one compile, one tile in memory at a time). The outputs are blended over the overlap in the
  reference's order (each tile with the already-blended tiles above and to its left), cropped to
  stride·scale and reassembled to `out_size`.
  """
  h, w = x.shape[2:4]
  starts = [(i, j) for i in range(0, h, stride[0]) for j in range(0, w, stride[1])]
  crops = {ij: x[:, :, ij[0]:ij[0] + tile[0], ij[1]:ij[1] + tile[1]] for ij in starts}
  outs = {}
  for shape in dict.fromkeys(c.shape for c in crops.values()):
    group = [ij for ij in starts if crops[ij].shape == shape]
    if unroll or len(group) == 1:
      outs.update({ij: getattr(module, method)(crops[ij], unroll) for ij in group})
      continue
    body = lambda mdl, carry, t: (carry, getattr(mdl, method)(t, unroll))
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    stacked = scan(module, None, jnp.stack([crops[ij] for ij in group]))[1]
    outs.update({ij: stacked[n] for n, ij in enumerate(group)})
  out_tile = (int(tile[0] * scale), int(tile[1] * scale))
  out_stride = (int(stride[0] * scale), int(stride[1] * scale))
  rows = [[outs[(i, j)] for j in range(0, w, stride[1])] for i in range(0, h, stride[0])]
  for i, row in enumerate(rows):
    for j, t in enumerate(row):
      if i > 0:
        t = _blend(rows[i - 1][j], t, out_tile[0] - out_stride[0], axis=2)
      if j > 0:
        t = _blend(row[j - 1], t, out_tile[1] - out_stride[1], axis=3)
      row[j] = t
  out = jnp.concatenate([jnp.concatenate([t[:, :, :out_stride[0], :out_stride[1]] for t in row],
                                         axis=3) for row in rows], axis=2)
  return out[:, :, :out_size[0], :out_size[1]]


class WanVAE(nn.Module):
  """The Wan 2.1 video VAE.

  ```python
  vae = WanVAE(cfg)                                    # cfg: a2jax.configs.VAEConfig
  params = vae.init(rng, jnp.zeros((1, 5, 16, 16, 3)))["params"]
  mean, logvar = vae.apply({"params": params}, video, method=vae.encode)  # (B, f, H/8, W/8, z)
  video = vae.apply({"params": params}, z, method=vae.decode)             # (B, F, H, W, 3)
  ```
  With `cfg.tiling`, inputs larger than a tile are processed tile by tile with diffusers'
  `enable_tiling` semantics (`tile_sample_min_*`, `tile_sample_stride_*`, overlap blending).
  """

  cfg: VAEConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    self.encoder = Encoder3d(cfg)
    self.quant_conv = conv3d(2 * cfg.z_dim, 1, **kw)
    self.post_quant_conv = conv3d(cfg.z_dim, 1, **kw)
    self.decoder = Decoder3d(cfg)

  def __call__(self, video: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (diffusers' forward): (B, F, H, W, 3) → same."""
    mean, _ = self.encode(video)
    return self.decode(mean)

  def encode(self, video: jax.Array, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
    """Video (B, F, H, W, 3) in [−1, 1], F = 4k + 1 → posterior (mean, logvar), each
    (B, k + 1, H/8, W/8, z_dim) float32; logvar clamped to [−30, 20] like diffusers."""
    cfg = self.cfg
    b, f, h, w, _ = video.shape
    if (f - 1) % 4:
      raise InputError(f"WanVAE.encode needs 4k + 1 frames, got {f}: pad or trim the video "
                       f"(diffusers silently drops the last {(f - 1) % 4})")
    tile = (cfg.tile_sample_min_height, cfg.tile_sample_min_width)
    if cfg.tiling and (h > tile[0] or w > tile[1]):
      stride = (cfg.tile_sample_stride_height, cfg.tile_sample_stride_width)
      scale = 1 / cfg.scale_factor_spatial
      enc = _tiled(self, "_encode_frames", video, unroll, tile, stride, scale,
                   (h // cfg.scale_factor_spatial, w // cfg.scale_factor_spatial))
    else:
      enc = self._encode_frames(video, unroll)
    mean, logvar = jnp.split(enc.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _encode_frames(self, video: jax.Array, unroll: bool) -> jax.Array:
    """(B, 4k + 1, H, W, 3) → quant_conv(encoder) (B, k + 1, H/8, W/8, 2·z_dim)."""
    video = _constrain(video.astype(dtype_of(self.cfg.dtype)))
    first, cache = self.encoder(video[:, :1], None, first=True)
    b, f = video.shape[:2]
    if f > 1:
      chunks = jnp.moveaxis(video[:, 1:].reshape(b, (f - 1) // 4, 4, *video.shape[2:]), 1, 0)
      rest = _scan_chunks(_encode_chunk, self, cache, chunks, unroll)
      first = jnp.concatenate([first, _frames_of_chunks(rest)], axis=1)
    return self.quant_conv(first)

  def decode(self, z: jax.Array, unroll: bool = False) -> jax.Array:
    """Latents (B, f, h, w, z_dim) → video (B, 4(f − 1) + 1, 8h, 8w, 3) in `cfg.dtype`, clamped
    to [−1, 1] like diffusers."""
    cfg = self.cfg
    s = cfg.scale_factor_spatial
    h, w = z.shape[2:4]
    tile = (cfg.tile_sample_min_height, cfg.tile_sample_min_width)
    if cfg.tiling and (h > tile[0] // s or w > tile[1] // s):
      stride = (cfg.tile_sample_stride_height // s, cfg.tile_sample_stride_width // s)
      out = _tiled(self, "_decode_frames", z, unroll, (tile[0] // s, tile[1] // s), stride, s,
                   (h * s, w * s))
    else:
      out = self._decode_frames(z, unroll)
    return jnp.clip(out, -1.0, 1.0)

  def decode_first(self, z: jax.Array) -> tuple[jax.Array, Cache]:
    """Streaming decode, its first step: the first latent frame (B, 1, h, w, z_dim) → (video
    (B, 1, 8h, 8w, 3) clamped to [−1, 1], the decoder's cache for `decode_next`). Untiled."""
    first, cache = self.decoder(self.post_quant_conv(_constrain(z)), None, first=True)
    return jnp.clip(first, -1.0, 1.0), cache

  def decode_next(self, cache: Cache, z: jax.Array) -> tuple[jax.Array, Cache]:
    """Streaming decode, every later step: one latent frame (B, 1, h, w, z_dim) after those the
    cache has seen → (video (B, 4, 8h, 8w, 3) clamped, the next cache). The cache has a fixed
    size, so a long video decodes in constant memory, one program for all its frames."""
    out, cache = self.decoder(self.post_quant_conv(_constrain(z)), cache, first=False)
    return jnp.clip(out, -1.0, 1.0), cache

  def _decode_frames(self, z: jax.Array, unroll: bool) -> jax.Array:
    """(B, f, h, w, z_dim) → decoder(post_quant_conv) (B, 4(f − 1) + 1, 8h, 8w, 3)."""
    x = self.post_quant_conv(_constrain(z))
    first, cache = self.decoder(x[:, :1], None, first=True)
    if x.shape[1] > 1:
      frames = jnp.moveaxis(x[:, 1:, None], 1, 0)          # (f − 1, B, 1, h, w, z)
      rest = _scan_chunks(_decode_chunk, self, cache, frames, unroll)
      first = jnp.concatenate([first, _frames_of_chunks(rest)], axis=1)
    return first


def normalize_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """(z − latents_mean) / latents_std over the channel axis (last)."""
  mean = jnp.asarray(cfg.latents_mean, jnp.float32)
  std = jnp.asarray(cfg.latents_std, jnp.float32)
  return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)


def denormalize_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
  """Inverse of `normalize_latents`: z · latents_std + latents_mean."""
  mean = jnp.asarray(cfg.latents_mean, jnp.float32)
  std = jnp.asarray(cfg.latents_std, jnp.float32)
  return (z.astype(jnp.float32) * std + mean).astype(z.dtype)


def init_abstract_boxed(cfg: VAEConfig):
  """Abstract parameters (ShapeDtypeStructs with logical boxes) of the whole VAE, no memory.

  Traced on a 5-frame 16×16 video so that every module (time convs included) is created."""
  video = jax.ShapeDtypeStruct((1, 5, 16, 16, cfg.in_channels), jnp.float32)
  return jax.eval_shape(lambda v: WanVAE(cfg).init(jax.random.key(0), v), video)["params"]
