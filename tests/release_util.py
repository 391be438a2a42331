"""Tiny random release folders of every model family, converted: shared by the tests' fixtures."""


def tiny_converted_release(tmp_path_factory, family: str):
  """(tiny random release folder of `family` in the release's layout, its conversion by
  convert_weights)."""
  from convert_weights import tiny_release
  from convert_weights.release import convert_release
  root = tmp_path_factory.mktemp(family)
  src = tiny_release.build(root / "release", seed=0, family=family)
  convert_release(src, root / "converted", progress=False)
  return src, root / "converted"
