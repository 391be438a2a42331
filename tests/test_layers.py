"""Imports point one way (DESIGN.md §0): every import of a2jax/ and convert_weights/, function-level
ones included, goes to a module on its own layer or a lower one, and no group of modules needs
each other. Read from the source with `ast`, so an import inside a function counts as much as one
at the top."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("a2jax", "convert_weights")

# Lowest first. A module belongs to the first layer holding its name or a package above it.
LAYERS = (
    # the floor: which backends load, typed errors, library logs, configs
    ("a2jax", "a2jax.platforms", "a2jax.errors", "a2jax.logs", "a2jax.configs"),
    # process-wide services and plain facts that need only configs
    ("a2jax.sharding", "a2jax.distributed", "a2jax.runner", "a2jax.video", "a2jax.flops"),
    ("a2jax.attention",),
    ("a2jax.models",),
    # what sampling and training share above the models
    ("a2jax.checkpoints", "a2jax.preprocess", "a2jax.conditioning", "a2jax.conditioning_v3",
     "a2jax.guidance", "a2jax.families", "a2jax.schedulers", "a2jax.step_cache",
     "a2jax.diffusion_forcing", "a2jax.text"),
    ("a2jax.pipeline",),
    # long video (diffusion-forcing folders, chained elements-to-video windows) on the pipeline
    ("a2jax.long_video",),
    ("a2jax.data",),
    ("a2jax.train",),
    ("a2jax.eval",),
    # the converters read the library; the library never reads them
    ("convert_weights",),
    # entry points: they may import anything below
    ("a2jax.app", "a2jax.demo", "a2jax.aot"),
)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _layer(module: str) -> int:
  """The most specific layer entry (longest matching name) decides, so `a2jax.app` is an entry
  point although `a2jax` is the floor."""
  best = max((n for names in LAYERS for n in names if module == n or module.startswith(n + ".")),
             key=len, default=None)
  if best is None or (best == "a2jax" and module != "a2jax"):
    raise AssertionError(f"{module} is on no layer of tests/test_layers.py: add it where it belongs")
  return next(depth for depth, names in enumerate(LAYERS) if best in names)


def _resolve(name: str) -> str | None:
  """The project module an imported name lives in (a package's attribute resolves to the package)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, path: pathlib.Path) -> set[str]:
  """Project modules that `module` (its source at `path`) imports anywhere in its source."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
          package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    found.update(r for r in map(_resolve, names) if r and r != module)
  return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
  upward = sorted(d for d in GRAPH[module] if _layer(d) > _layer(module))
  assert not upward, (f"{module} (layer {_layer(module)}) imports {upward} from a higher layer: "
                      "move the shared name down, or the code up")


def test_no_import_cycles():
  """Also within a layer: two modules that need each other are one concept in two files."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(GRAPH[m]):
      if state.get(d) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
  """An import inside a function counts: configs importing the models would show."""
  path = tmp_path / "configs.py"
  path.write_text("import json\nfrom . import errors\n\ndef f():\n  from a2jax.models.lora import X\n")
  found = imports_of("a2jax.configs", path)
  assert found == {"a2jax.errors", "a2jax.models.lora"}
  assert any(_layer(d) > _layer("a2jax.configs") for d in found)
  assert _layer("a2jax.app") > _layer("convert_weights.lora") > _layer("a2jax.pipeline")
