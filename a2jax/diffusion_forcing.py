"""Diffusion forcing (SkyReels-V2): every latent frame its own noise level, windows chained by a
history of latents, as diffusers' `SkyReelsV2DiffusionForcingPipeline` (and its image-to-video
variant) samples a video of any length.

One window of f latent frames runs the rows of a timestep matrix (R, f): row r gives each frame the
timestep the transformer sees, and an update mask says which frames the scheduler steps. Each
frame keeps its own scheduler state (diffusers deep-copies one scheduler per frame), stepped only
where its mask is set. `ar_step` 0 denoises all frames together (R = steps); `ar_step` k > 0
starts each causal block k rows after the one before it (a denoising wave), so earlier frames are
cleaner than later ones. A window of equal shape reuses its compiled program; its rows are one
`lax.scan`.

Windows: the first has `base_frames` pixel frames; each next one starts with the last
`overlap_history` frames of the video so far as clean latents (a prefix the scheduler never steps,
optionally re-noised by `addnoise_condition` before each transformer call) and adds the rest. The
history never leaves latent space (no decode/encode between windows).

Shapes: B videos, f latent frames of a window, h / w latent height / width, z latent channels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from a2jax import schedulers, sharding
from a2jax.configs import TransformerConfig
from a2jax.errors import InputError
from a2jax.guidance import branch_contexts, branch_count, classifier_free
from a2jax.models.transformer import A2Transformer
from a2jax.video import latent_frames

NOT_STARTED_TIMESTEP = 999  # what a frame whose denoising has not begun shows the transformer


def fps_index(fps: int) -> int:
  """SkyReels-V2's frame-rate class: 0 for 16 fps, 1 for any other rate."""
  return 0 if fps == 16 else 1


@dataclasses.dataclass(frozen=True)
class Window:
  """One window of the plan: `frames` latent frames, the first `prefix` of them history latents
  (or the given first frame) that the scheduler does not step; `keep_from`: the window's frames
  from this index on extend the video."""

  frames: int
  prefix: int
  keep_from: int


def window_plan(num_latent: int, base_latent: int, overlap_latent: int | None,
                causal_block: int) -> list[Window]:
  """The windows that make `num_latent` latent frames from windows of at most `base_latent`, each
  after the first starting with `overlap_latent` frames of history (cut down to whole causal
  blocks, as the reference does); one window when the video fits in one."""
  if overlap_latent is None or num_latent <= base_latent:
    return [Window(num_latent, 0, 0)]
  stride = base_latent - overlap_latent
  count = 2 + (num_latent - base_latent - 1) // stride
  windows = [Window(base_latent, 0, 0)]
  for k in range(1, count):
    done = k * stride + overlap_latent
    windows.append(Window(min(num_latent - done + overlap_latent, base_latent),
                          overlap_latent - overlap_latent % causal_block, overlap_latent))
  return windows


def timestep_matrix(num_latent: int, timesteps: np.ndarray, ar_step: int, num_pre_ready: int,
                    causal_block: int, base_latent: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps (R, f) int32 of every row and frame, update mask (R, f) bool) of one window.

  The rows index a template [999, *timesteps, 0] per causal block: a block advances one index a
  row once the block before it is `ar_step` indices ahead (ar_step 0: together) or done; the
  first `num_pre_ready` frames (whole blocks of them) start done. A frame is stepped in a row
  when its index moved and is not past the end. `base_latent` < f (a window longer than the model
  sees at once) needs ar_step ≥ steps / (base blocks): the reference's rule.
  """
  steps = len(timesteps)
  rows_end = steps + 1
  blocks = num_latent // causal_block
  if base_latent is not None and base_latent // causal_block < blocks:
    least = steps / (base_latent // causal_block)
    if ar_step < least:
      raise InputError(f"ar_step {ar_step} is too small for {blocks} causal blocks in windows of "
                       f"{base_latent // causal_block}: use at least {int(np.ceil(least))}")
  template = np.concatenate([[NOT_STARTED_TIMESTEP], np.asarray(timesteps, np.int64), [0]])
  previous = np.zeros(blocks, np.int64)
  previous[:num_pre_ready // causal_block] = rows_end
  values, masks = [], []
  while not np.all(previous >= rows_end - 1):
    row = np.zeros(blocks, np.int64)
    for i in range(blocks):
      started = i == 0 or previous[i - 1] >= rows_end - 1
      row[i] = previous[i] + 1 if started else row[i - 1] - ar_step
    row = row.clip(0, rows_end)
    masks.append((row != previous) & (row != rows_end))
    values.append(template[row])
    previous = row
  expand = lambda a: np.repeat(np.stack(a), causal_block, axis=1)
  return expand(values).astype(np.int32), expand(masks)


def num_rows(window: Window, timesteps: np.ndarray, ar_step: int, causal_block: int) -> int:
  """The rows of a window's timestep matrix: the transformer calls it takes."""
  return len(timestep_matrix(window.frames, timesteps, ar_step, window.prefix, causal_block)[0])


def _row_normal(keys: jax.Array, path: tuple, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal (B, *shape): row b from its own key (B,) folded with each of `path`, so that a
  row gets the same noise in any batch."""
  def one(key):
    for n in path:
      key = jax.random.fold_in(key, n)
    return jax.random.normal(key, shape)
  return jax.vmap(one)(keys)


def window_noise(keys: jax.Array, window: int, shape: tuple[int, ...]) -> jax.Array:
  """The initial noise (B, *shape) of window `window`."""
  return _row_normal(keys, (window,), shape)


def history_noise(keys: jax.Array, window: int, row: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The `addnoise_condition` noise (B, *shape) mixed into the history prefix at timestep-matrix
  row `row` of window `window` (a fresh draw per row, as the reference's)."""
  return _row_normal(keys, (window, row), shape)


def window_fn(cfg: TransformerConfig, sched: schedulers.UniPC | schedulers.Euler,
              window: Window, *, ar_step: int, causal_block: int, guidance: float,
              addnoise_condition: float, on_row: Callable[[jax.Array], None] | None = None
              ) -> Callable[..., jax.Array]:
  """The denoising of one window, to be jitted: (transformer params, latents (B, f, h, w, z) =
  noise with the prefix frames set, text (B, T, text_dim), negative_text (B, T, text_dim) (unused
  at guidance 1), fps_index (B,) int32, history_keys (B, 2) uint32 PRNG key data, window_index ()
  int32) → latents (B, f, h, w, z).

  Classifier-free guidance runs its two branches as one batch; the transformer is `cfg` with
  block-causal attention over `causal_block` frames. The window's index is an input, so windows of
  one shape share the program. `on_row(r)` is called from inside the loop after row r (progress)."""
  values, update = timestep_matrix(window.frames, sched.timesteps, ar_step, window.prefix,
                                   causal_block)
  model_t = values.astype(np.float32)
  noise_factor = 0.001 * addnoise_condition
  if addnoise_condition > 0 and window.prefix:
    model_t[:, :window.prefix] = addnoise_condition  # the re-noised history's level
  model = A2Transformer(dataclasses.replace(cfg, num_frame_per_block=causal_block))
  branches = branch_count(guidance)
  frame_axis = lambda a: a[None, :, None, None, None]  # (f,) → broadcast over (B, f, h, w, z)

  def run(params, latents, text, negative_text, fps_index, history_keys, window_index):
    b = latents.shape[0]
    history_keys = jax.random.wrap_key_data(history_keys)
    context = branch_contexts(text, negative_text, branches)
    fps_n = jnp.concatenate([fps_index] * branches, axis=0)
    # One scheduler state per frame: states stacked on a leading frame axis.
    state = jax.vmap(sched.init, in_axes=1)(latents)

    def row_step(carry, inputs):
      x, state = carry
      r, t_model, mask = inputs
      x_in = x
      if addnoise_condition > 0 and window.prefix:
        noise = history_noise(history_keys, window_index, r, (window.prefix, *x.shape[2:]))
        prefix = x[:, :window.prefix] * (1.0 - noise_factor) + noise * noise_factor
        x_in = x.at[:, :window.prefix].set(prefix)
      x_in = sharding.constrain(jnp.concatenate([x_in] * branches, axis=0),
                                ("batch", "frames", "height", "width", "channels"))
      t = jnp.broadcast_to(t_model, (branches * b, window.frames))
      v = model.apply({"params": params}, x_in, t, context, None,
                      fps_n if cfg.inject_sample_info else None).astype(jnp.float32)
      v = classifier_free(v, b, guidance)
      stepped, stepped_state = jax.vmap(sched.step, in_axes=(0, 1, 1), out_axes=(1, 0))(state, v, x)
      stepped_state = _as_stepped_in_place(sched, state, stepped_state, stepped)
      x = jnp.where(frame_axis(mask), stepped, x)
      state = jax.tree.map(
          lambda new, old: jnp.where(mask.reshape(-1, *[1] * (old.ndim - 1)), new, old),
          stepped_state, state)
      if on_row is not None:
        jax.debug.callback(on_row, r)
      return (x, state), None

    rows = (jnp.arange(len(values)), jnp.asarray(model_t), jnp.asarray(update))
    (x, _), _ = jax.lax.scan(row_step, (latents, state), rows)
    return x

  return run


def _as_stepped_in_place(sched, before, after, stepped):
  """The reference steps each frame's scheduler on a view of its latents and writes the result
  back into them. On a step without the UniPC corrector (the first, and any after a
  `disable_corrector` index) the scheduler keeps that view as its last sample, so the write makes
  the next corrector start from the stepped sample. States of every frame (leading frame axis);
  `stepped` (B, f, h, w, z)."""
  if not isinstance(sched, schedulers.UniPC):
    return after  # Euler keeps no sample
  without = ~jnp.asarray(sched.corrector_on())[before.step_index]  # (f,)
  aliased = jnp.where(without[:, None, None, None, None], jnp.moveaxis(stepped, 1, 0),
                      after.last_sample)
  return after._replace(last_sample=aliased)


def sample_latents(run_window: Callable[[Window, int, jax.Array], jax.Array],
                   windows: Sequence[Window], noise_keys: jax.Array, latent_shape: tuple[int, ...],
                   first_frame: jax.Array | None = None) -> np.ndarray:
  """Chains the windows: `run_window(window, index, latents)` denoises one window's latents
  (B, f, h, w, z); window 0 starts from noise (its first latent frame `first_frame` (B, 1, h, w, z)
  for image-to-video), each later one from the last history frames of the video so far, then
  noise. Returns the whole video's latents (B, Σ frames kept, h, w, z) on the host."""
  video = None
  for index, window in enumerate(windows):
    latents = window_noise(noise_keys, index, (window.frames, *latent_shape))
    if index == 0 and first_frame is not None:
      latents = latents.at[:, :first_frame.shape[1]].set(first_frame)
    elif index > 0:
      history = video[:, video.shape[1] - window.keep_from:][:, :window.prefix]
      latents = latents.at[:, :window.prefix].set(history)
    out = np.asarray(run_window(window, index, latents))
    video = out if video is None else np.concatenate([video, out[:, window.keep_from:]], axis=1)
  return video


def plan(frames: int, base_frames: int | None, overlap_history: int | None, causal_block: int,
         first_frame: bool = False) -> list[Window]:
  """The windows of a video of `frames` pixel frames (4k + 1) in windows of `base_frames` with
  `overlap_history` frames of history, in latent frames; with `first_frame` (image-to-video) the
  first window starts with the given frame's latent as a one-frame prefix."""
  num_latent = latent_frames(frames)
  base_latent = num_latent if base_frames is None else latent_frames(base_frames)
  overlap = None if overlap_history is None else latent_frames(overlap_history)
  if overlap is not None and num_latent > base_latent and overlap >= base_latent:
    raise InputError(f"overlap_history {overlap_history} is not shorter than the window of "
                     f"{base_frames} frames: keep fewer history frames (e.g. 17 with windows of "
                     "97)")
  if num_latent > base_latent and overlap is None:
    raise InputError(f"{frames} frames do not fit one window of {base_frames}: give "
                     "overlap_history (e.g. 17) to chain windows")
  windows = window_plan(num_latent, base_latent, overlap, causal_block)
  uneven = [w.frames for w in windows if w.frames % causal_block]
  if uneven:
    raise InputError(f"causal blocks of {causal_block} latent frames do not divide a window of "
                     f"{uneven[0]} latent frames: choose frames, base_frames and the block size so "
                     f"that every window's latent frames ((F − 1) / 4 + 1) are a multiple of it")
  if first_frame:
    windows[0] = dataclasses.replace(windows[0], prefix=1)
  return windows
