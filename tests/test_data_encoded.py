"""Encoded records: write → read round trip, seeded order, iterator state, CFG dropout, host shards."""

import numpy as np
import pytest

from a2jax.data import encoded
from a2jax.errors import InputError

N = 10


def make_record(i: int) -> dict[str, np.ndarray]:
  """Record i: random contents, with i written into every array's first element to identify it."""
  rng = np.random.default_rng(i)
  rec = {"latents": rng.normal(size=(2, 3, 5, 16)), "condition": rng.normal(size=(2, 3, 5, 20)),
         "text": rng.normal(size=(8, 32)), "image": rng.normal(size=(6, 24)) + 1.0}
  for v in rec.values():
    v.flat[0] = i
  return {k: v.astype(np.float32) for k, v in rec.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("encoded") / "ds"
  encoded.write_encoded((make_record(i) for i in range(N)), out, num_shards=3,
                        metadata={"frames": 5})
  return out


def ids(batch):
  return [int(x) for x in batch["latents"].reshape(len(batch["latents"]), -1)[:, 0]]


def take(it, n):
  return [next(it) for _ in range(n)]


def test_round_trip(data_dir):
  spec = encoded.read_spec(data_dir)
  assert spec["num_records"] == N and spec["metadata"] == {"frames": 5}
  assert [s["num_records"] for s in spec["shards"]] == [4, 3, 3]
  it = encoded.encoded_loader(data_dir, batch_size=1, seed=0, num_epochs=1)
  seen = {}
  for batch in it:
    assert set(batch) == set(encoded.FEATURES)
    (i,) = ids(batch)
    seen[i] = {k: v[0] for k, v in batch.items()}
  assert sorted(seen) == list(range(N))
  for i, rec in seen.items():
    for k, v in make_record(i).items():
      assert rec[k].dtype == np.float32 and rec[k].shape == v.shape
      np.testing.assert_array_equal(rec[k], v)


def test_batches_and_seeded_order(data_dir):
  a = take(encoded.encoded_loader(data_dir, batch_size=3, seed=7), 7)   # crosses epochs
  b = take(encoded.encoded_loader(data_dir, batch_size=3, seed=7), 7)
  c = take(encoded.encoded_loader(data_dir, batch_size=3, seed=8), 7)
  assert a[0]["latents"].shape == (3, 2, 3, 5, 16) and a[0]["condition"].shape == (3, 2, 3, 5, 20)
  assert a[0]["text"].shape == (3, 8, 32) and a[0]["image"].shape == (3, 6, 24)
  assert [ids(x) for x in a] == [ids(x) for x in b]
  assert [ids(x) for x in a] != [ids(x) for x in c]
  order = sum((ids(x) for x in a), [])
  # every epoch is a permutation of all records, and epochs are shuffled differently
  assert sorted(order[:N]) == sorted(order[N:2 * N]) == list(range(N))
  assert order[:N] != order[N:2 * N]
  for x, y in zip(a, b):
    for k in encoded.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("consumed", [2, 4])   # mid-epoch, and past the first epoch's end
def test_iterator_state_restores(data_dir, consumed):
  kwargs = dict(batch_size=3, seed=3, text_dropout=0.3, ref_dropout=0.3)
  it = encoded.encoded_loader(data_dir, **kwargs)
  take(it, consumed)
  state = it.get_state()
  expected = take(it, 3)
  fresh = encoded.encoded_loader(data_dir, **kwargs)
  fresh.set_state(state)
  for x, y in zip(take(fresh, 3), expected):
    for k in encoded.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])


def test_cfg_dropout(data_dir):
  kwargs = dict(batch_size=1, seed=5, text_dropout=0.4, ref_dropout=0.6)
  a = take(encoded.encoded_loader(data_dir, **kwargs), 200)
  b = take(encoded.encoded_loader(data_dir, **kwargs), 200)
  dropped_text, dropped_refs = [], []
  for x, y in zip(a, b):
    (i,) = ids(x)
    ref = make_record(i)
    np.testing.assert_array_equal(x["text"], y["text"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["latents"][0], ref["latents"])    # never dropped
    np.testing.assert_array_equal(x["condition"][0], ref["condition"])
    for key, log in (("text", dropped_text), ("image", dropped_refs)):
      log.append(not x[key].any())
      if not log[-1]:
        np.testing.assert_array_equal(x[key][0], ref[key])
  # 200 draws: the observed rates lie within ±0.12 of p (> 3.4 standard deviations)
  assert abs(np.mean(dropped_text) - 0.4) < 0.12 and abs(np.mean(dropped_refs) - 0.6) < 0.12
  assert np.mean(np.array(dropped_text) == np.array(dropped_refs)) < 0.9   # independent draws
  none = take(encoded.encoded_loader(data_dir, batch_size=5, seed=5), 4)
  assert all(x["text"].any(axis=(1, 2)).all() and x["image"].any(axis=(1, 2)).all() for x in none)
  every = take(encoded.encoded_loader(data_dir, batch_size=5, seed=5, text_dropout=1.0,
                                      ref_dropout=1.0), 4)
  assert not any(x["text"].any() or x["image"].any() for x in every)


def test_host_shards_are_disjoint_and_equal(data_dir):
  per_host = []
  for host in range(3):
    it = encoded.encoded_loader(data_dir, batch_size=1, seed=0, shard_index=host, shard_count=3,
                                num_epochs=1)
    per_host.append(sum((ids(b) for b in it), []))
  assert [len(h) for h in per_host] == [3, 3, 3]              # 10 records: the tail of 1 dropped
  assert len(set(sum(per_host, []))) == 9


def test_errors(tmp_path, data_dir):
  bad = [make_record(0), {**make_record(1), "text": np.zeros((9, 32), np.float32)}]
  with pytest.raises(InputError, match="text"):
    encoded.write_encoded(iter(bad), tmp_path / "bad")
  assert not (tmp_path / "bad" / encoded.SPEC_FILE).exists()
  assert not list((tmp_path / "bad").glob("*.array_record*"))
  with pytest.raises(InputError, match="exactly"):
    encoded.write_encoded([{"latents": np.zeros(3)}], tmp_path / "keys")
  with pytest.raises(InputError, match="spec.json"):
    encoded.encoded_loader(tmp_path / "nothing", batch_size=1, seed=0)
  with pytest.raises(InputError, match="already"):
    encoded.write_encoded([make_record(0)], data_dir)
  with pytest.raises(InputError, match="probability"):
    encoded.encoded_loader(data_dir, batch_size=1, seed=0, text_dropout=1.5)
