"""Typed, frozen configs: YAML presets in `configs/`, dotted `key=value` overrides, release `config.json`.

Component configs carry the field names of the release's `config.json` files (diffusers /
transformers), plus a2jax's own fields (dtypes, remat, attention backend) with float32 defaults.
Everything is validated on load: an unknown key, a wrong type or an impossible combination raises
`ConfigError` with one line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from typing import Any, ClassVar

import yaml

from a2jax.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "offload")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
QUANTIZED_WEIGHTS = ("native", "int8", "fp8")  # a2jax/models/quant.py
MODEL_FAMILIES = ("a2", "v3_r2v", "v2_df")  # a2jax/families.py
# Latent frames a family appends to the video's in time (V3 R2V: its reference slots), which the
# DiT sees as tokens too (a2jax/conditioning_v3.py, a2jax/flops.py).
REFERENCE_FRAMES = {"a2": 0, "v3_r2v": 4, "v2_df": 0}
NUM_TRAIN_TIMESTEPS = 1000  # the flow schedules' training steps; timesteps are 1000·σ
# The Dense modules of an A2 block that a LoRA may target, as "module.projection": a2jax.models.lora
# finds each at params["blocks"][module][projection]. The default targets leave out the FFN.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out_0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out_0",
                "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net_0", "ffn.net_2")

# Keys that diffusers / transformers write into every `config.json` and that do not change the
# computation. Component configs add their own (dropout, initialisation, decoder-only settings).
BOOKKEEPING_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset", "architectures", "model_type", "torch_dtype", "dtype",
    "transformers_version", "return_dict", "output_hidden_states", "output_attentions",
    "use_return_dict", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_word_embeddings", "pruned_heads", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id",
    "eos_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "use_cache", "initializer_range", "initializer_factor",
    "_use_default_values",  # diffusers' in-memory `model.config` bookkeeping
})


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"{owner}.{name} = {value!r} is not one of {list(choices)}: pick one of them")


def check_positive(owner: str, **values: float) -> None:
  for name, value in values.items():
    if not value > 0:  # NaN included
      raise ConfigError(f"{owner}.{name} = {value} must be positive")


def check_distill_timesteps(owner: str, timesteps, num_train_timesteps: int) -> tuple[int, ...]:
  """The training steps of a step-distilled schedule as ints: decreasing, in (0, num_train_timesteps]."""
  ts = tuple(int(t) for t in timesteps)
  if not ts or any(not 0 < t <= num_train_timesteps for t in ts) or any(
      a <= b for a, b in zip(ts, ts[1:])):
    raise ConfigError(f"{owner}.distill_timesteps = {list(timesteps)} must be decreasing training "
                      f"steps in (0, {num_train_timesteps}], e.g. [1000, 750, 500, 250]")
  return ts


@dataclasses.dataclass(frozen=True)
class ComponentConfig:
  """Base of component configs: `from_dict` of a release `config.json`, shared validation."""

  # Keys of the reference's `config.json` accepted and ignored beyond BOOKKEEPING_KEYS.
  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset()

  @classmethod
  def from_dict(cls, raw: dict[str, Any], **a2jax_fields: Any):
    """Builds the config from a `config.json` dict as `save_pretrained` writes it.

    Bookkeeping keys are dropped; any other key that is not a field is an error. `a2jax_fields`
    sets a2jax's own fields (dtypes, remat, attention).
    """
    ignored = BOOKKEEPING_KEYS | cls.IGNORED_KEYS
    kept = {k: v for k, v in raw.items() if k not in ignored}
    kept.update(a2jax_fields)
    return build(cls, kept, cls.__name__)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ComponentConfig):
  """A2Transformer = diffusers `WanTransformer3DModel` with the I2V options. Defaults = diffusers'."""

  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  image_dim: int | None = None
  added_kv_proj_dim: int | None = None
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None
  # SkyReels-V2's `SkyReelsV2Transformer3DModel` (diffusion forcing): the fps embedding, and
  # block-causal self-attention over blocks of this many latent frames (1: full attention).
  inject_sample_info: bool = False
  num_frame_per_block: int = 1
  # a2jax
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"
  # "native" (the param dtype), "int8" or "fp8": the blocks' matmul kernels quantized at load
  weights: str = "native"

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def rope_dims(self) -> tuple[int, int, int]:
    """Head-dim split (t, h, w) of the 3D RoPE: d − 4⌊d/6⌋ : 2⌊d/6⌋ : 2⌊d/6⌋."""
    d = self.attention_head_dim
    hw = 2 * (d // 6)
    return d - 2 * hw, hw, hw

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, num_attention_heads=self.num_attention_heads,
                   attention_head_dim=self.attention_head_dim, num_layers=self.num_layers,
                   ffn_dim=self.ffn_dim, in_channels=self.in_channels,
                   out_channels=self.out_channels, text_dim=self.text_dim,
                   num_frame_per_block=self.num_frame_per_block)
    if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
      raise ConfigError(f"{name}.patch_size = {self.patch_size} must be three positive ints (t, h, w)")
    if self.freq_dim % 2:
      raise ConfigError(f"{name}.freq_dim = {self.freq_dim} must be even (sin and cos halves)")
    if self.attention_head_dim % 2 or any(p % 2 or p <= 0 for p in self.rope_dims):
      raise ConfigError(
          f"{name}.attention_head_dim = {self.attention_head_dim} cannot be split into even RoPE "
          f"parts t:h:w = {self.rope_dims}: use an even head dim of at least 6 (e.g. 128)")
    if self.qk_norm not in (None, "rms_norm_across_heads"):
      raise ConfigError(f"{name}.qk_norm = {self.qk_norm!r}: only 'rms_norm_across_heads' or null")
    if (self.image_dim is None) != (self.added_kv_proj_dim is None):
      raise ConfigError(f"{name}: image_dim and added_kv_proj_dim must both be set (I2V) or both null")
    if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
      raise ConfigError(
          f"{name}.added_kv_proj_dim = {self.added_kv_proj_dim} must equal heads × head_dim = "
          f"{self.inner_dim}")
    if self.pos_embed_seq_len is not None:
      raise ConfigError(f"{name}.pos_embed_seq_len is for the FLF2V model, not A2: set it to null")
    _check_choice(name, "param_dtype", self.param_dtype, DTYPES)
    _check_choice(name, "dtype", self.dtype, DTYPES)
    _check_choice(name, "remat", self.remat, REMAT_POLICIES)
    _check_choice(name, "attention", self.attention, ATTENTION_BACKENDS)
    _check_choice(name, "weights", self.weights, QUANTIZED_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ComponentConfig):
  """WanVAE = diffusers `AutoencoderKLWan` (Wan 2.1 layout). Defaults = diffusers'."""

  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"dropout"})

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = (
      -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
  latents_std: tuple[float, ...] = (
      2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916)
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None
  scale_factor_temporal: int | None = 4
  scale_factor_spatial: int | None = 8
  # a2jax
  param_dtype: str = "float32"
  dtype: str = "float32"
  tiling: bool = False
  tile_sample_min_height: int = 256
  tile_sample_min_width: int = 256
  tile_sample_stride_height: int = 192
  tile_sample_stride_width: int = 192
  attention: str = "xla"

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, base_dim=self.base_dim, z_dim=self.z_dim,
                   num_res_blocks=self.num_res_blocks)
    if self.attn_scales:
      raise ConfigError(f"{name}.attn_scales = {self.attn_scales}: diffusers' AutoencoderKLWan cannot "
                        "run attention in its down blocks; use [] (as every Wan VAE does)")
    if self.scale_factor_spatial != 2 ** (len(self.dim_mult) - 1):
      raise ConfigError(f"{name}.scale_factor_spatial = {self.scale_factor_spatial} must be "
                        f"2^(len(dim_mult) − 1) = {2 ** (len(self.dim_mult) - 1)}")
    check_positive(name, tile_sample_min_height=self.tile_sample_min_height,
                   tile_sample_min_width=self.tile_sample_min_width,
                   tile_sample_stride_height=self.tile_sample_stride_height,
                   tile_sample_stride_width=self.tile_sample_stride_width)
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ConfigError(f"{name}.temperal_downsample needs len(dim_mult) − 1 = "
                        f"{len(self.dim_mult) - 1} entries, got {len(self.temperal_downsample)}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ConfigError(f"{name}.latents_mean / latents_std need z_dim = {self.z_dim} entries each")
    if self.is_residual or self.patch_size is not None:
      raise ConfigError(f"{name}: is_residual / patch_size describe the Wan 2.2 VAE; A2 uses Wan 2.1 "
                        "(is_residual: false, patch_size: null)")
    _check_choice(name, "param_dtype", self.param_dtype, DTYPES)
    _check_choice(name, "dtype", self.dtype, DTYPES)
    _check_choice(name, "attention", self.attention, ATTENTION_BACKENDS)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ComponentConfig):
  """CLIPVisionEncoder = transformers `CLIPVisionModel` (open-clip ViT-H/14). Defaults = ViT-H/14."""

  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"attention_dropout", "dropout"})

  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 1024
  # a2jax: build `visual_projection` (CLIPVisionModelWithProjection; the open-clip `visual.head`).
  # The release's image encoder is a plain CLIPVisionModel and sampling never uses it.
  with_projection: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  attention: str = "xla"

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                   num_attention_heads=self.num_attention_heads, patch_size=self.patch_size,
                   projection_dim=self.projection_dim)
    if self.num_hidden_layers < 2:
      raise ConfigError(f"{name}.num_hidden_layers = {self.num_hidden_layers}: the image tokens are "
                        "the penultimate layer's output, use at least 2 layers")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{name}: hidden_size {self.hidden_size} is not a multiple of "
                        f"num_attention_heads {self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ConfigError(f"{name}: image_size {self.image_size} is not a multiple of patch_size "
                        f"{self.patch_size}")
    _check_choice(name, "hidden_act", self.hidden_act, ("gelu", "quick_gelu", "gelu_new",
                                                          "gelu_pytorch_tanh"))
    _check_choice(name, "param_dtype", self.param_dtype, DTYPES)
    _check_choice(name, "dtype", self.dtype, DTYPES)
    _check_choice(name, "attention", self.attention, ATTENTION_BACKENDS)


@dataclasses.dataclass(frozen=True)
class UMT5Config(ComponentConfig):
  """UMT5Encoder = transformers `UMT5EncoderModel` (umt5-xxl). Defaults = umt5-xxl."""

  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({
      "dropout_rate", "num_decoder_layers", "scalable_attention", "classifier_dropout",
      "gradient_checkpointing", "tokenizer_class", "output_past",
      # derived from feed_forward_proj: transformers recomputes them on load
      "dense_act_fn", "is_gated_act"})

  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  # a2jax
  param_dtype: str = "float32"
  dtype: str = "float32"
  max_length: int = 512

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv,
                   d_ff=self.d_ff, num_layers=self.num_layers, num_heads=self.num_heads,
                   max_length=self.max_length)
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
      raise ConfigError(f"{name}.relative_attention_num_buckets = "
                        f"{self.relative_attention_num_buckets} must be even and ≥ 4 (umT5: 32)")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
      raise ConfigError(f"{name}.relative_attention_max_distance = "
                        f"{self.relative_attention_max_distance} must exceed num_buckets / 4 "
                        "(the exact buckets; umT5: 128)")
    _check_choice(name, "feed_forward_proj", self.feed_forward_proj, ("gated-gelu",))
    _check_choice(name, "param_dtype", self.param_dtype, DTYPES)
    _check_choice(name, "dtype", self.dtype, DTYPES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes ("data", "fsdp", "context", "tensor"); at most one may be −1 (the rest)."""

  data: int = 1
  fsdp: int = -1
  context: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.astuple(self)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh sizes {dict(zip(('data', 'fsdp', 'context', 'tensor'), sizes))}: "
                        "use positive sizes, with at most one −1 for 'all remaining devices'")


SAMPLERS = ("unipc", "euler", "distill")
# Step caching inside the compiled loop (a2jax/step_cache.py).
CACHES = ("none", "mag", "teacache", "fbcache")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Elements-to-video sampling. `shift` is THE flow shift: training draws its noise levels from the
  same shifted schedule (there is no second shift)."""

  frames: int = 81
  height: int = 480
  width: int = 832
  steps: int = 50
  guidance: float = 5.0
  image_guidance: float | None = None  # v3_r2v only: the reference guidance (None: 1)
  shift: float = 8.0
  seed: int = 42
  sampler: str = "unipc"
  fps: int = 16
  negative_prompt: str | None = None  # None: the release's default negative prompt
  drop_reference_frames: bool = True   # drop the first 4·N output frames, which show the references
  condition_posterior: str = "mean"    # "mean" (Wan I2V) or "sample" (the release)
  # sampler "distill" (a step-distilled model, e.g. lightx2v's LoRA): these training steps of the
  # flow schedule shifted by distill_shift; `steps` and `shift` are then unused
  distill_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
  distill_shift: float = 5.0
  # step caching (docs/sampling.md "Fast sampling"): none | mag | teacache | fbcache
  cache: str = "none"
  cache_threshold: float | None = None  # None: the mode's default (mag 0.12, teacache 0.26, fbcache 0.05)
  cache_max_skips: int = 4              # mag: at most this many skipped steps in a row
  cache_retention: float = 0.2          # mag, teacache: this first share of steps always runs
  cache_calibration: str | None = None  # mag: the JSON curve of `sample.py --calibrate OUT.json`
  # diffusion forcing (family v2_df, a2jax/diffusion_forcing.py; diffusers' names): windows of
  # base_frames (None: the whole video in one) chained by overlap_history frames of latent
  # history; ar_step 0 denoises a window's frames together, k > 0 starts each causal block of
  # causal_block_size latent frames k steps after the one before; addnoise_condition re-noises
  # the history to this noise level (0: off; the reference suggests 20)
  base_frames: int | None = None
  overlap_history: int | None = None
  ar_step: int = 0
  causal_block_size: int = 1
  addnoise_condition: float = 0.0

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, frames=self.frames, height=self.height, width=self.width,
                   steps=self.steps, fps=self.fps)
    if (self.frames - 1) % 4:
      raise ConfigError(f"{name}.frames = {self.frames} must be 4k+1 (e.g. 17, 33, 81)")
    if self.height % 16 or self.width % 16:
      raise ConfigError(f"{name}: height {self.height} and width {self.width} must be multiples of 16")
    if self.shift <= 0:
      raise ConfigError(f"{name}.shift = {self.shift} must be positive")
    if self.image_guidance is not None and self.image_guidance < 0:
      raise ConfigError(f"{name}.image_guidance = {self.image_guidance} must be ≥ 0")
    _check_choice(name, "sampler", self.sampler, SAMPLERS)
    _check_choice(name, "condition_posterior", self.condition_posterior, ("mean", "sample"))
    _check_choice(name, "cache", self.cache, CACHES)
    check_positive(name, distill_shift=self.distill_shift, cache_max_skips=self.cache_max_skips)
    if self.cache_threshold is not None and self.cache_threshold < 0:
      raise ConfigError(f"{name}.cache_threshold = {self.cache_threshold} must be ≥ 0 (0: never skip)")
    if not 0 <= self.cache_retention <= 1:
      raise ConfigError(f"{name}.cache_retention = {self.cache_retention} must be in [0, 1]")
    if self.cache == "mag" and not self.cache_calibration:
      raise ConfigError(f"{name}.cache = 'mag' needs cache_calibration: a curve written by "
                        "sample.py --checkpoint FOLDER --prompt ... --calibrate curve.json")
    if self.sampler == "distill":
      check_distill_timesteps(name, self.distill_timesteps, NUM_TRAIN_TIMESTEPS)
    for field in ("base_frames", "overlap_history"):
      value = getattr(self, field)
      if value is not None and (value < 1 or (value - 1) % 4):
        raise ConfigError(f"{name}.{field} = {value} must be 4k+1 frames (e.g. 17, 97)")
    check_positive(name, causal_block_size=self.causal_block_size)
    if self.ar_step < 0 or self.addnoise_condition < 0:
      raise ConfigError(f"{name}: ar_step {self.ar_step} and addnoise_condition "
                        f"{self.addnoise_condition} must be ≥ 0")

  @property
  def uses_diffusion_forcing(self) -> bool:
    """Whether any diffusion-forcing option differs from one plain window."""
    return (self.base_frames is not None or self.overlap_history is not None or self.ar_step != 0
            or self.causal_block_size != 1 or self.addnoise_condition != 0)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the blocks' projections: W' = W + (alpha / rank) · A·B per target (Flax
  kernels (in, out): A (in, rank), B (rank, out) zero at the start). Targets are names of
  LORA_TARGETS ("attn1.to_q", "attn2.add_k_proj", "ffn.net_0", …)."""

  rank: int = 32
  alpha: float = 32.0
  # every block's attention projections: self-attention, text cross-attention and image branch
  targets: tuple[str, ...] = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out_0",
                              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out_0",
                              "attn2.add_k_proj", "attn2.add_v_proj")

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, rank=self.rank, alpha=self.alpha)
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ConfigError(f"{name}.targets = {list(self.targets)}: {unknown[0] + ' is unknown; ' if unknown else ''}"
                        f"give distinct names among {sorted(LORA_TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Flow-matching fine-tuning of the A2 transformer (see a2jax/train/)."""

  run_name: str = "a2"
  output_dir: str = "runs"
  seed: int = 0
  steps: int = 1000
  # a converted a2jax folder whose transformer/ starts the run; null: random initialisation
  init_from: str | None = None
  batch_size: int = 1            # global batch per optimizer step (all hosts, all micro-batches)
  grad_accum_steps: int = 1      # micro-batches per step (a scan; gradients summed in float32)
  # loss (a2jax/train/loss.py); the flow shift is sampling.shift
  timestep_sampling: str = "uniform"   # uniform | logit_normal
  logit_mean: float = 0.0
  logit_std: float = 1.0
  loss_weighting: str = "none"         # none | cosmap
  # optimizer: AdamW, linear warmup then cosine decay to learning_rate · min_lr_ratio at `steps`
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0
  # Adam's two moments: float32, or bfloat16 (half their memory; full fine-tuning of the 14B on one
  # v5p-8 host needs it, docs/training.md "Training"); the master parameters stay in param_dtype
  moments_dtype: str = "float32"
  ema_decay: float | None = None       # e.g. 0.9999; null: no EMA parameters
  # checkpoints under {output_dir}/{run_name}/checkpoints/<step>/
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  # metrics and profiling
  log_every: int = 10
  profile_start_step: int | None = None  # first step traced by jax.profiler; null: no trace
  profile_steps: int = 3
  # null: fine-tune every parameter; a LoRAConfig (e.g. train.lora.rank=32): train low-rank
  # adapters only, the base parameters frozen in their param_dtype (docs/training.md "Training a LoRA")
  lora: LoRAConfig | None = None

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, steps=self.steps, batch_size=self.batch_size,
                   grad_accum_steps=self.grad_accum_steps, checkpoint_every=self.checkpoint_every,
                   keep_checkpoints=self.keep_checkpoints, log_every=self.log_every,
                   profile_steps=self.profile_steps, learning_rate=self.learning_rate,
                   logit_std=self.logit_std, adam_eps=self.adam_eps)
    if self.batch_size % self.grad_accum_steps:
      raise ConfigError(f"{name}.batch_size = {self.batch_size} is not a multiple of "
                        f"grad_accum_steps = {self.grad_accum_steps}")
    _check_choice(name, "timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
    _check_choice(name, "loss_weighting", self.loss_weighting, ("none", "cosmap"))
    _check_choice(name, "moments_dtype", self.moments_dtype, ("float32", "bfloat16"))
    if not 0 <= self.warmup_steps < self.steps:
      raise ConfigError(f"{name}.warmup_steps = {self.warmup_steps} must be within [0, steps = "
                        f"{self.steps}): the cosine decay needs at least one step")
    if not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or self.max_grad_norm < 0:
      raise ConfigError(f"{name}: min_lr_ratio must be in [0, 1], weight_decay and max_grad_norm "
                        "non-negative (max_grad_norm 0 turns clipping off)")
    if not (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1):
      raise ConfigError(f"{name}: adam_b1 and adam_b2 must be in [0, 1)")
    if self.ema_decay is not None and not 0 < self.ema_decay < 1:
      raise ConfigError(f"{name}.ema_decay = {self.ema_decay} must be in (0, 1), or null")
    if self.profile_start_step is not None and self.profile_start_step < 1:
      raise ConfigError(f"{name}.profile_start_step = {self.profile_start_step} must be ≥ 1 "
                        "(steps count from 1), or null")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data: TFDS/ArrayRecord triplets read by grain (see a2jax/data/).

  `data_dir` holds encoded records (python -m a2jax.data.encode) for the DiT-only step. `frames`,
  `height`, `width`, `frame_stride` are the training bucket of the raw-triplet pipeline (and of
  the encoding). Dropout probabilities are per sample and independent: the text is replaced by
  zeros, the references' CLIP tokens by zeros (classifier-free guidance).
  """

  data_dir: str = "data"
  split: str = "train"
  seed: int = 0
  text_dropout: float = 0.1
  ref_dropout: float = 0.1
  frames: int = 81
  height: int = 480
  width: int = 832
  frame_stride: int = 1
  num_threads: int = 4
  prefetch: int = 4
  # train.py's source: "encoded" records in data_dir, or "synthetic" random batches of the bucket's
  # shapes (smoke runs, benchmarks) with these context lengths
  source: str = "encoded"
  synthetic_text_len: int = 512
  synthetic_refs: int = 3

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, frames=self.frames, height=self.height, width=self.width,
                   frame_stride=self.frame_stride, num_threads=self.num_threads,
                   prefetch=self.prefetch, synthetic_text_len=self.synthetic_text_len,
                   synthetic_refs=self.synthetic_refs)
    _check_choice(name, "source", self.source, ("encoded", "synthetic"))
    for key in ("text_dropout", "ref_dropout"):
      if not 0.0 <= getattr(self, key) <= 1.0:
        raise ConfigError(f"{name}.{key} = {getattr(self, key)} must be a probability in [0, 1]")
    if (self.frames - 1) % 4:
      raise ConfigError(f"{name}.frames = {self.frames} must be 4k+1 (e.g. 17, 33, 81)")
    if self.height % 16 or self.width % 16:
      raise ConfigError(f"{name}: height {self.height} and width {self.width} must be multiples of 16")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins the others (a2jax.distributed.initialize; docs/multi-host.md "Multi-host").

  All null: the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID fill them; without those, JAX detects TPU pod slices, SLURM and Open MPI itself;
  with none of these, one process."""

  coordinator_address: str | None = None  # host:port of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300       # seconds every process waits for all to connect
  heartbeat_timeout: int = 100            # seconds without heartbeats before a process counts as lost

  def __post_init__(self):
    name = type(self).__name__
    check_positive(name, initialization_timeout=self.initialization_timeout,
                   heartbeat_timeout=self.heartbeat_timeout)
    if self.num_processes is not None and self.num_processes < 1:
      raise ConfigError(f"{name}.num_processes = {self.num_processes} must be ≥ 1")
    if self.process_id is not None and (self.process_id < 0 or (
        self.num_processes is not None and self.process_id >= self.num_processes)):
      raise ConfigError(f"{name}.process_id = {self.process_id} must be in [0, num_processes = "
                        f"{self.num_processes})")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole a2jax config: the model family (a2jax/families.py), one section per component, the
  mesh, sampling, training and data. A v3_r2v config's clip section is unused."""

  family: str = "a2"
  transformer: TransformerConfig = TransformerConfig()
  vae: VAEConfig = VAEConfig()
  clip: CLIPConfig = CLIPConfig()
  umt5: UMT5Config = UMT5Config()
  mesh: MeshConfig = MeshConfig()
  sampling: SamplingConfig = SamplingConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  distributed: DistributedConfig = DistributedConfig()

  def __post_init__(self):
    _check_choice("Config", "family", self.family, MODEL_FAMILIES)
    if self.family == "a2" and self.sampling.image_guidance is not None:
      raise ConfigError("sampling.image_guidance is a SkyReels-V3 R2V option (family v3_r2v); an A2 "
                        "config has one guidance: set image_guidance to null")
    t = self.transformer
    if self.family == "v2_df" and (t.image_dim is not None or t.in_channels != t.out_channels):
      raise ConfigError(f"a SkyReels-V2 diffusion-forcing transformer takes the latents alone and "
                        f"has no image branch, this one has in_channels {t.in_channels} for "
                        f"{t.out_channels} out and image_dim {t.image_dim}: it is not a DF model")
    if self.family == "v3_r2v" and (t.image_dim is not None or t.in_channels != t.out_channels):
      raise ConfigError(f"a SkyReels-V3 R2V transformer takes the latents alone and has no image "
                        f"branch (its references come as frames), this one has in_channels "
                        f"{t.in_channels} for {t.out_channels} out and image_dim {t.image_dim}: "
                        f"set transformer.in_channels={t.out_channels} transformer.image_dim=null "
                        "transformer.added_kv_proj_dim=null")


# ---------------------------------------------------------------------------------------------
# Building and validating from plain data.


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
  """Checks `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _coerce(value, option, where)
      except ConfigError as e:
        errors.append(e)
    raise errors[0]
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where} = {value!r} must be a list, not {type(value).__name__}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{where} = {list(value)} must have {len(args)} entries")
    return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
    return build(tp, value, where)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
    try:
      return float(value)
    except ValueError:
      pass
  if tp is bool and not isinstance(value, bool):
    raise ConfigError(f"{where} = {value!r} must be true or false")
  if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
    raise ConfigError(f"{where} = {value!r} must be {_type_name(tp)}, not {type(value).__name__}")
  return value


def build(cls, raw: dict[str, Any], where: str):
  """Builds dataclass `cls` from `raw`, rejecting unknown keys and wrong types; nested sections too."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise ConfigError(f"unknown key {where}.{unknown[0]}: valid keys are {sorted(fields)}")
  values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
  try:
    return cls(**values)
  except TypeError as e:  # a field without default left out
    raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg) -> dict[str, Any]:
  """Plain-data form of a config (tuples as lists), what `load` reads back."""
  def plain(v):
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v
  return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = tree
  for i, part in enumerate(parents):
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ConfigError(f"override {dotted}: {'.'.join(parents[:i + 1])} is not a section")
    node = child
  node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
  """Applies `section.key=value` strings (values parsed as YAML) to a plain config dict."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not key=value (e.g. transformer.num_layers=2)")
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError:
      raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    _set_dotted(raw, key.strip(), value)
  return raw


def resolve_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
  """A preset name (`a2_14b`) → `configs/a2_14b.yaml`; a path is used as it is."""
  path = pathlib.Path(name_or_path)
  if path.suffix in (".yaml", ".yml") or path.exists():
    if not path.is_file():
      raise ConfigError(f"config file {path} does not exist")
    return path
  preset = CONFIG_DIR / f"{name_or_path}.yaml"
  if not preset.is_file():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {name_or_path!r}: use one of {names} or a YAML path")
  return preset


def read_yaml(path: pathlib.Path) -> dict[str, Any]:
  try:
    raw = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
  return raw


# Keys that config.yaml files written by earlier a2jax versions hold (converted folders, runs):
# dropped on load when they say nothing (null / false), an error naming the replacement otherwise.
RETIRED_KEYS = {("train", "distributed"): "processes join through the `distributed` section "
                                          "(docs/multi-host.md \"Multi-host\"): delete the key"}


def _drop_retired(raw: dict[str, Any], where: str) -> dict[str, Any]:
  for (section, key), replacement in RETIRED_KEYS.items():
    values = raw.get(section)
    if isinstance(values, dict) and key in values:
      value = values.pop(key)
      if value not in (None, False):
        raise ConfigError(f"{where}: {section}.{key} = {value!r} is retired: {replacement}")
  return raw


def load(name_or_path: str | pathlib.Path = "a2_14b", overrides=(), cls=Config):
  """Loads a preset name or YAML path, applies `key=value` overrides, validates into `cls`."""
  path = resolve_path(name_or_path)
  raw = _drop_retired(read_yaml(path), str(path))
  return build(cls, apply_overrides(raw, list(overrides)), "config")
