"""Triplet builder (TFDS → ArrayRecord) and the grain pipeline, on a generated folder of tiny mp4s."""

import json

import numpy as np
import pytest

from a2jax import conditioning, preprocess
from a2jax.data import pipeline, triplets
from a2jax import video as video_io
from a2jax.errors import InputError
from data_util import make_source

FRAMES, HEIGHT, WIDTH = 9, 32, 48
CLIP = preprocess.ClipImageProcessor(shortest_edge=28, crop_size=(28, 28))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return make_source(tmp_path_factory.mktemp("triplets_src"))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("triplets_data")
  builder = triplets.build(source, data_dir, min_frames=FRAMES)
  return data_dir, builder


def test_build_counts_and_names_bad_records(built, source, capsys):
  data_dir, builder = built
  meta = builder.info.metadata
  assert meta["min_frames"] == FRAMES
  assert meta["num_references"]["train"] == {"1": 1, "2": 4} and meta["bad_records"]["train"] == 7
  report = json.loads(builder.report_file.read_text())["train"]
  assert report["written"] == 5 and report["bad"] == 7
  got = {(b["name"], b["reason"]) for b in report["bad_records"]}
  assert got == {("clips/short.mp4", "too_few_frames"), ("clips/broken.mp4", "unreadable_video"),
                 ("clips/gone.mp4", "missing_video"), ("lost", "missing_reference"),
                 ("badbox", "bad_reference"), ("norefs", "no_references"),
                 ("train.jsonl:12", "bad_json")}
  assert report["reasons"]["too_few_frames"] == 1
  # reopening reads the same metadata; rebuilding reuses the data and says so
  assert triplets.open_dataset(data_dir).info.metadata["bad_records"]["train"] == 7
  triplets.build(source, data_dir, min_frames=FRAMES)
  assert "reusing" in capsys.readouterr().out


def test_summary_is_printed(source, tmp_path, capsys):
  triplets.build(source, tmp_path, min_frames=FRAMES)
  out = capsys.readouterr().out
  assert "train: 5 records written, 7 bad" in out and "clips/broken.mp4 (unreadable_video)" in out


def test_stored_records(built, source):
  _, builder = built
  src = builder.as_data_source()["train"]
  records = {r["name"].decode(): r for r in (src[i] for i in range(len(src)))}
  assert sorted(records) == ["clips/c0.mp4", "clips/c1.mp4", "clips/c2.mp4", "clips/c4.mp4", "third"]
  r0 = records["clips/c0.mp4"]
  assert r0["references"]["role"] == [b"subject", b"background"]     # background moved last
  assert r0["video"] == (source / "clips/c0.mp4").read_bytes() and r0["num_frames"] == 12
  np.testing.assert_array_equal(triplets.decode_image(r0["references"]["image"][0]),
                                preprocess.load_image(source / "refs/man.png"))
  dog, bear = (triplets.decode_image(b) for b in records["clips/c1.mp4"]["references"]["image"])
  frame = video_io.read_frames(source / "clips/c1.mp4", [3])[0]
  np.testing.assert_array_equal(dog, frame[10:20, 5:30])              # cut to the mask's extent
  np.testing.assert_array_equal(bear, preprocess.load_image(source / "refs/bear.png")[3:20, 2:15])
  assert (bear[:, :10] == 255).all()                                  # transparency on white


def loader(data_dir, **kw):
  args = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, seed=0, num_references=2, batch_size=2,
              text_dropout=0.5, ref_dropout=0.5, clip_processor=CLIP, num_threads=2)
  args.update(kw)
  return pipeline.triplet_loader(data_dir, **args)


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pipeline_examples(built, source):
  data_dir, _ = built
  batch = next(loader(data_dir, frame_stride=1))
  assert batch["video"].shape == (2, FRAMES, HEIGHT, WIDTH, 3) and batch["video"].dtype == np.float32
  assert batch["references"].shape == (2, 2, HEIGHT, WIDTH, 3)
  assert batch["clip"].shape == (2, 2, 28, 28, 3)
  manifest = {json.loads(x).get("name") or json.loads(x)["video"]: json.loads(x)
              for x in (source / "train.jsonl").read_text().splitlines()[:5]}
  for j, name in enumerate(batch["name"]):
    entry, start = manifest[str(name)], int(batch["start"][j])
    assert str(batch["caption"][j]) == entry["caption"]
    raw = video_io.read_frames(source / entry["video"], range(start, start + FRAMES))
    want = preprocess.to_vae_pixels(np.stack([preprocess.crop_background(f, HEIGHT, WIDTH)
                                              for f in raw]))
    np.testing.assert_array_equal(batch["video"][j], want)
  # the references are built as sampling builds them
  src = triplets.open_dataset(data_dir).as_data_source()["train"]
  stored = next(src[i] for i in range(len(src)) if src[i]["name"] == b"clips/c4.mp4")
  man, forest = (triplets.decode_image(b) for b in stored["references"]["image"])
  example = pipeline.decode_example(stored, np.random.default_rng(0), frames=FRAMES,
                                    height=HEIGHT, width=WIDTH, frame_stride=1, text_dropout=0.0,
                                    ref_dropout=0.0, clip_processor=CLIP)
  np.testing.assert_array_equal(example["references"],
                                conditioning.reference_pixels([man], forest, HEIGHT, WIDTH))
  np.testing.assert_array_equal(example["clip"], preprocess.clip_reference_pixels([man, forest], CLIP))


def test_pipeline_deterministic_and_restorable(built):
  data_dir, _ = built
  a = [next(it) for it in [loader(data_dir)] for _ in range(3)]
  it = loader(data_dir)
  b = [next(it) for _ in range(3)]
  for x, y in zip(a, b):
    assert_same(x, y)
  other = [next(it) for it in [loader(data_dir, seed=1)] for _ in range(3)]
  assert any(not np.array_equal(x["start"], y["start"]) or list(x["name"]) != list(y["name"])
             for x, y in zip(a, other))
  # restored mid-epoch (4 clips with 2 references: one batch in), it continues with the same batch
  it = loader(data_dir)
  next(it)
  state = it.get_state()
  expected = [next(it), next(it)]
  fresh = loader(data_dir)
  fresh.set_state(state)
  for x, y in zip([next(fresh), next(fresh)], expected):
    assert_same(x, y)


def test_pipeline_hosts_and_stride(built):
  data_dir, _ = built
  names = []
  for host in range(2):
    it = loader(data_dir, batch_size=1, num_references=None, shard_index=host, shard_count=2,
                num_epochs=1, frames=5, frame_stride=2)
    batches = list(it)
    assert all(b["video"].shape == (1, 5, HEIGHT, WIDTH, 3) for b in batches)
    names.append([str(b["name"][0]) for b in batches])
  assert len(names[0]) == len(names[1]) == 2 and not set(names[0]) & set(names[1])


def test_pipeline_errors(built):
  data_dir, _ = built
  single = list(loader(data_dir, num_references=1, batch_size=1, num_epochs=1))
  assert [str(b["name"][0]) for b in single] == ["clips/c2.mp4"]
  with pytest.raises(InputError, match="min-frames"):
    loader(data_dir, frames=17)
  with pytest.raises(InputError, match="num_references"):
    loader(data_dir, num_references=None)
  with pytest.raises(InputError, match="latent frames"):   # 2 references need ≥ 9 frames
    loader(data_dir, frames=5)
  with pytest.raises(InputError, match="split"):
    loader(data_dir, split="validation")
  with pytest.raises(InputError, match="no built triplets"):
    loader(data_dir / "nothing")
