"""The synthetic_elements builder: deterministic, captions / references / videos agree, a held-out
split of unseen combinations, and its clips feed the triplet and encoding paths."""

import re

import numpy as np
import pytest

from a2jax import conditioning, preprocess
from a2jax.data import pipeline, synthetic, triplets
from a2jax.errors import InputError

# 13 frames: two elements + the background need 3 latent frames before the video's own.
TINY = dict(frames=13, height=32, width=48, train_examples=6, heldout_examples=4, seed=3)
PHRASE = re.compile(r"a (small|large) (\w+) (striped )?(\w+) moves (left|right|up|down)")
BACKGROUND = re.compile(r"across an? (\w+) (\w+) background$")


def tiny_config(name="tiny", **overrides):
  return synthetic.SyntheticConfig(name=name, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def built(data_dir):
  return synthetic.build(data_dir, tiny_config(), verbose=False)


def records(builder, split):
  source = builder.as_data_source()[split]
  return sorted((source[i] for i in range(len(source))), key=lambda r: r["name"])


def test_builder_is_deterministic(built, tmp_path):
  again = synthetic.build(tmp_path, tiny_config(), verbose=False)
  for split in synthetic.SPLITS:
    a, b = records(built, split), records(again, split)
    assert len(a) == len(b) == {"train": 6, "heldout": 4}[split]
    assert a == b
  other = synthetic.sample_clip(tiny_config(seed=4), "train", 0)
  assert other != synthetic.sample_clip(tiny_config(), "train", 0)


def test_records_decode_and_spec_round_trips(built):
  for record in records(built, "train"):
    clip = synthetic.record_clip(record)
    assert synthetic.Clip.from_json(clip.to_json()) == clip
    frames = synthetic.record_frames(record)
    assert frames.shape == (13, 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, synthetic.render_frames(clip))
    refs = synthetic.record_references(record)
    assert [r.decode() for r in record["references"]["role"]] == (
        ["object"] * len(clip.elements) + ["background"])
    assert record["caption"].decode() == clip.caption
    assert len(refs) == len(clip.elements) + 1


def _dominant(pixels: np.ndarray) -> tuple[int, ...]:
  values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
  return tuple(int(v) for v in values[np.argmax(counts)])


@pytest.mark.parametrize("split", synthetic.SPLITS)
def test_caption_references_and_video_agree(split):
  """What the caption names is what is drawn: each element's colour in its reference and in the
  video, its motion in the video, the background's colour; the references show the background
  alone and each element alone on white."""
  cfg = tiny_config(patterns=("solid",), height=64, width=64)
  for i in range(8):
    clip = synthetic.sample_clip(cfg, split, i)
    caption = clip.caption
    phrases = PHRASE.findall(caption)
    bg_colour, bg_kind = BACKGROUND.search(caption).groups()
    assert len(phrases) == len(clip.elements)
    assert set(caption.split()) <= set(synthetic.vocabulary())
    frames = synthetic.render_frames(clip)
    refs = synthetic.render_references(clip)
    background = refs[-1]
    assert bg_kind in synthetic.BACKGROUND_KINDS
    # The background reference is the video wherever no element is drawn, and its colour.
    for t, frame in enumerate(frames):
      covered = np.any([synthetic.shape_coverage(e.shape, clip.centres(k)[t], clip.diameter(k),
                                                 64, 64) > 0 for k, e in enumerate(clip.elements)], 0)
      np.testing.assert_array_equal(frame[~covered], background[~covered])
    base = np.asarray(synthetic.BACKGROUND_COLOURS[bg_colour], np.float64)
    assert np.abs(background.reshape(-1, 3).mean(0) - base).max() < 0.25 * 255
    for k, (size, colour, striped, shape, direction) in enumerate(phrases):
      rgb = synthetic.COLOURS[colour]
      # Reference: white and the named colour only (plus anti-aliased edges).
      ref = refs[k]
      drawn = ~np.all(ref == 255, axis=-1)
      assert _dominant(ref[drawn]) == rgb
      # Video: pixels of exactly the named colour, moving the stated way.
      centroids = []
      for frame in frames:
        ys, xs = np.nonzero(np.all(frame == rgb, axis=-1))
        assert len(xs) > 0.3 * drawn.sum()
        centroids.append((xs.mean(), ys.mean()))
      step = np.diff(np.asarray(centroids), axis=0)
      dx, dy = synthetic.DIRECTIONS[direction]
      assert np.all(step @ np.array([dx, dy]) > 0.5)
      assert np.all(np.abs(step @ np.array([dy, -dx])) < 0.5)
      # Size: between a triangle's and a circle's area at the named diameter.
      disc = np.pi / 4 * (synthetic.SIZES[size] * 64) ** 2
      assert 0.3 * disc < drawn.sum() < 1.15 * disc


def test_heldout_combinations_never_seen_in_training():
  cfg = synthetic.SyntheticConfig(name="split", frames=13, height=32, width=32, seed=0)
  train = [synthetic.sample_clip(cfg, "train", i) for i in range(400)]
  heldout = [synthetic.sample_clip(cfg, "heldout", i) for i in range(40)]
  pairs = lambda clips: {(e.identity, c.background.identity) for c in clips for e in c.elements}
  assert not pairs(train) & pairs(heldout)
  # Each held-out element and background is seen in training, only not together.
  assert {e.identity for c in heldout for e in c.elements} <= {e.identity for c in train for e in c.elements}
  assert {c.background.identity for c in heldout} <= {c.background.identity for c in train}
  for clip in train + heldout:
    bg = synthetic.render_background(clip.background, 32, 32)
    assert all(synthetic.contrast(e, bg) >= synthetic.MIN_CONTRAST for e in clip.elements)
    assert len({e.colour for e in clip.elements}) == len(clip.elements)


def test_config_errors():
  with pytest.raises(InputError, match="4k\\+1"):
    tiny_config(frames=12)
  with pytest.raises(InputError, match="references need"):
    tiny_config(frames=9)       # 2 elements + background need 4 latent frames
  with pytest.raises(InputError, match="one or two"):
    tiny_config(max_elements=3)
  with pytest.raises(InputError, match="patterns"):
    tiny_config(patterns=("dotted",))
  with pytest.raises(InputError, match="split"):
    synthetic.sample_clip(tiny_config(), "test", 0)


def test_encoder_example_matches_the_sampling_layout(built):
  processor = preprocess.ClipImageProcessor(shortest_edge=28, crop_size=(28, 28))
  record = records(built, "heldout")[0]
  example = synthetic.encoder_example(record, processor)
  clip = synthetic.record_clip(record)
  refs = synthetic.render_references(clip)
  np.testing.assert_array_equal(example["video"],
                                preprocess.to_vae_pixels(synthetic.render_frames(clip)))
  np.testing.assert_array_equal(example["references"],
                                conditioning.reference_pixels(refs[:-1], refs[-1], 32, 48))
  assert example["clip"].shape == (len(refs), 28, 28, 3)
  assert example["caption"] == clip.caption


def test_export_feeds_the_triplet_builder(data_dir, built, tmp_path):
  """export_triplets → python -m a2jax.data.triplets → the grain pipeline decodes the clips."""
  synthetic.export_triplets(data_dir, tmp_path / "src",
                            config=tiny_config(), splits=("heldout",))
  triplets.build(tmp_path / "src", tmp_path / "data", min_frames=13, verbose=False)
  ds = pipeline.triplet_dataset(tmp_path / "data", frames=13, height=32, width=48, seed=0,
                                split="heldout", num_epochs=1, shuffle=False,
                                clip_processor=preprocess.ClipImageProcessor(
                                    shortest_edge=28, crop_size=(28, 28)))
  by_name = {r["name"].decode(): r for r in records(built, "heldout")}
  for example in ds:
    clip = synthetic.record_clip(by_name[example["name"]])
    truth = preprocess.to_vae_pixels(synthetic.render_frames(clip))
    assert np.abs(example["video"] - truth).mean() < 0.05    # H.264 at crf 17
    refs = synthetic.render_references(clip)
    np.testing.assert_array_equal(example["references"],
                                  conditioning.reference_pixels(refs[:-1], refs[-1], 32, 48))
    assert example["caption"] == clip.caption
