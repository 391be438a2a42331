"""Evaluation: the synthetic fidelity score is high for the truth and low for wrong videos; the
A2-Bench-style CLIP metrics; the `python -m a2jax.eval` CLI."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from a2jax import checkpoints, configs, video
from a2jax.data import synthetic
from a2jax.errors import InputError
from a2jax.eval import __main__ as cli
from a2jax.eval import bench, fidelity
from a2jax.models import clip as clip_model
from a2jax.preprocess import ClipImageProcessor

CFG = synthetic.SyntheticConfig(name="eval", frames=17, height=64, width=64, train_examples=4,
                                heldout_examples=3, seed=1)
KEPT = 9   # frames a two-element sample keeps (17 − 4·2)


def clips(n=6):
  return [synthetic.sample_clip(CFG, "train", i) for i in range(n)]


def kept(clip):
  return synthetic.render_frames(clip)[-KEPT:]


def wrong_colours(clip):
  """The clip's shapes and motions in other colours (each tone beyond the tolerance of every
  original tone), on a background of another kind and colour."""
  tones = [np.asarray(t, float) for e in clip.elements for t in e.tones]
  free = [c for c in synthetic.COLOURS
          if all(np.linalg.norm(np.asarray(t, float) - o) >= fidelity.TOLERANCE for o in tones
                 for t in dataclasses.replace(clip.elements[0], colour=c).tones)]
  kinds = [k for k in synthetic.BACKGROUND_KINDS if k != clip.background.kind]
  colours = [c for c in synthetic.BACKGROUND_COLOURS if c != clip.background.colour]
  return dataclasses.replace(
      clip, background=dataclasses.replace(clip.background, kind=kinds[0], colour=colours[0]),
      elements=tuple(dataclasses.replace(e, colour=c) for e, c in zip(clip.elements, free)))


def test_truth_scores_high_and_wrong_videos_low(tmp_path):
  """Ground truth ≥ 0.9 (≥ 0.75 through H.264); time-reversed: motion ≈ 0, fidelity ≥ 0.2 lower;
  other colours on another background, a gray video: ≤ 0.3."""
  for clip in clips():
    truth = fidelity.score_video(kept(clip), clip)
    assert truth["fidelity"] >= 0.9, truth
    assert min(truth[k] for k in fidelity.SCORES) >= 0.8
    video.write_mp4(tmp_path / "t.mp4", synthetic.render_frames(clip), 8)
    assert fidelity.score_video(video.read_mp4(tmp_path / "t.mp4")[-KEPT:], clip)["fidelity"] >= 0.75
    reversed_ = fidelity.score_video(kept(clip)[::-1], clip)
    assert reversed_["motion"] <= 0.05
    assert reversed_["fidelity"] <= truth["fidelity"] - 0.2
    assert fidelity.score_video(kept(wrong_colours(clip)), clip)["fidelity"] <= 0.3
    assert fidelity.score_video(np.full_like(kept(clip), 128), clip)["fidelity"] <= 0.3


def test_each_part_detects_its_error():
  """A wrong colour zeroes that element's colour; a wrong shape lowers its shape; a static element
  has no motion; the elements drawn on another background lose the background score."""
  clip = clips(1)[0]
  truth = fidelity.score_video(kept(clip), clip)
  e0 = clip.elements[0]
  others = [c for c in synthetic.COLOURS if all(c != e.colour for e in clip.elements)]
  recoloured = dataclasses.replace(clip, elements=(dataclasses.replace(e0, colour=others[0]),
                                                   *clip.elements[1:]))
  assert fidelity.score_video(kept(recoloured), clip)["elements"][0]["colour"] == 0.0
  shape = "star" if e0.shape != "star" else "square"
  reshaped = dataclasses.replace(clip, elements=(dataclasses.replace(e0, shape=shape),
                                                 *clip.elements[1:]))
  assert (fidelity.score_video(kept(reshaped), clip)["elements"][0]["shape"]
          <= truth["elements"][0]["shape"] - 0.15)
  still = np.repeat(kept(clip)[:1], KEPT, axis=0)
  assert fidelity.score_video(still, clip)["motion"] == 0.0
  moved = dataclasses.replace(clip, background=wrong_colours(clip).background)
  assert fidelity.score_video(kept(moved), clip)["background"] <= 0.5
  summary = fidelity.summarize([truth, fidelity.score_video(still, clip)])
  assert summary["fidelity"] == pytest.approx(
      (truth["fidelity"] + fidelity.score_video(still, clip)["fidelity"]) / 2)


TINY_CLIP = configs.CLIPConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, image_size=28, patch_size=14)
PROCESSOR = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


@pytest.fixture(scope="module")
def clip_params():
  return clip_model.init_params(TINY_CLIP, jax.random.key(0))


def test_bench_metrics(clip_params):
  processor = ClipImageProcessor.from_dict(PROCESSOR)
  clip = clips(1)[0]
  refs = synthetic.render_references(clip)
  moving = bench.score_video(kept(clip), refs, clip_params, TINY_CLIP, processor)
  static = bench.score_video(np.repeat(kept(clip)[:1], KEPT, 0), refs, clip_params, TINY_CLIP,
                             processor)
  assert len(moving["reference_similarity"]) == len(refs)
  assert all(-1 <= s <= 1 for s in moving["reference_similarity"])
  assert static["frame_consistency"] == pytest.approx(1.0, abs=1e-5)
  assert static["motion_magnitude"] == 0.0 < moving["motion_magnitude"]
  assert moving["frame_consistency"] < 1.0
  summary = bench.summarize([moving, static])
  assert summary["motion_magnitude"] == pytest.approx(moving["motion_magnitude"] / 2)


def test_cli(tmp_path, clip_params, capsys):
  data = synthetic.build(tmp_path / "data", CFG, verbose=False)
  source = data.as_data_source()["heldout"]
  for record in source:
    frames = synthetic.record_frames(record)
    video.write_mp4(tmp_path / "videos" / f"{record['name'].decode()}.mp4", frames[-KEPT:], 8)
  assert cli.main(["fidelity", "--data-dir", str(tmp_path / "data"), "--config", "eval",
                   "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "f.json")]) == 0
  result = json.loads((tmp_path / "f.json").read_text())
  assert len(result["videos"]) == len(source)
  assert result["mean"]["fidelity"] >= 0.75   # the truth, through H.264
  (tmp_path / "videos" / "stray.mp4").write_bytes(
      (tmp_path / "videos" / f"{source[0]['name'].decode()}.mp4").read_bytes())
  assert cli.main(["fidelity", "--data-dir", str(tmp_path / "data"), "--config", "eval",
                   "--videos", str(tmp_path / "videos")]) == 2
  assert "stray.mp4" in capsys.readouterr().err
  folder = tmp_path / "model"
  folder.mkdir()
  checkpoints.write_config(folder, configs.Config(clip=TINY_CLIP))
  checkpoints.save_params(folder / "clip", clip_params)
  (folder / "image_processor").mkdir()
  (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
  record = source[0]
  for k, image in enumerate(synthetic.record_references(record)):
    Image.fromarray(image).save(tmp_path / f"ref{k}.png")
  n = len(record["references"]["role"])
  job = {"refs": [f"ref{k}.png" for k in range(n - 1)], "background": f"ref{n - 1}.png",
         "out": f"videos/{record['name'].decode()}.mp4", "prompt": record["caption"].decode()}
  (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
  assert cli.main(["bench", "--checkpoint", str(folder), "--jobs", str(tmp_path / "jobs.jsonl"),
                   "--out", str(tmp_path / "b.json")]) == 0
  result = json.loads((tmp_path / "b.json").read_text())
  assert set(result["mean"]) == {"reference_similarity", "frame_consistency", "motion_magnitude"}
  assert len(result["videos"][job["out"]]["reference_similarity"]) == n


def test_long_video_scores_windows_joins_and_drift():
  """A video cut into windows at latent-frame boundaries: the truth scores high in every window
  and joins as smoothly as inside (ratio near 1); its second window in other colours on another
  background jumps at the join, loses the first window's fidelity and drifts in colour."""
  from a2jax import long_video
  from a2jax.eval import long_video as long_scores
  plan = long_video.chain_plan(25, 17, 1, scene_start=2)   # 2 windows: 9 frames, then 8 more
  spans = long_scores.window_spans(plan, 25, drop=8)
  assert spans == [(0, 9), (9, 17)]
  clip = clips(1)[0]
  truth = synthetic.render_frames(clip)
  scored = long_scores.score_long_video(truth, clip, spans)
  assert all(w["fidelity"] > 0.8 for w in scored["windows"])
  assert 0.5 < scored["continuity"]["ratio"] < 2.0 and abs(scored["drift"]) < 0.1
  jumped = np.concatenate([truth[:9], synthetic.render_frames(wrong_colours(clip))[9:]])
  bad = long_scores.score_long_video(jumped, clip, spans)
  assert bad["continuity"]["ratio"] > 2 * scored["continuity"]["ratio"]
  assert bad["windows"][1]["fidelity"] < scored["windows"][1]["fidelity"] - 0.3
  assert bad["drift"] < -0.3
  summary = long_scores.summarize([scored, bad])
  assert summary["first"] == pytest.approx(scored["windows"][0]["fidelity"])
  with pytest.raises(InputError, match="the windows end at frame 17, the video has 16"):
    long_scores.score_long_video(truth[:16], clip, spans)
