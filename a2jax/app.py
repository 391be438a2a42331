"""Web app: references + prompt → video in the browser (Gradio), the SkyReels-A2 release's layout.

  python -m a2jax.app --checkpoint a2jax-14b     # then open http://127.0.0.1:7860
  make app                                       # the `make demo` model (trained first if missing)

One pipeline lives as long as the app: its compiled programs (one per shape and sampling config)
are kept between requests, and requests queue so that one job at a time runs on the accelerator.
Bad input (no reference, an unreadable image, a size or frame count the model cannot take, an empty
prompt) is a message in the page; the app keeps serving. Videos are written atomically to
`--out-dir`. Nothing is fetched from the internet: analytics and the Hugging Face hub are off
before gradio is imported, the examples are local images (a2jax/app_examples/).
"""

from __future__ import annotations

import os

# Before gradio is imported: no analytics, no hub look-ups (the app works offline).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from a2jax import configs, preprocess, video  # noqa: E402
from a2jax.errors import A2JaxError, InputError  # noqa: E402
from a2jax.runner import run_main  # noqa: E402

EXAMPLES_DIR = pathlib.Path(__file__).parent / "app_examples"
REFERENCE_SLOTS = 3  # subjects / objects, in order; the background has its own slot
IMAGE_HEIGHT = 180   # pixels of each reference slot in the page


@dataclasses.dataclass(frozen=True)
class Option:
  """One control of the page that sets a value of a request by name (`key`): a field of
  `SamplingConfig` (taken by `sampling_config`), or any other key a request reads itself.
  `widget(app)` builds it (defaults: the checkpoint's sampling config, `app.pipe.cfg.sampling`);
  `parse` turns the widget's value into the request's."""

  key: str
  widget: Callable[["App"], Any]
  parse: Callable[[Any], Any] = lambda value: value


def _number(label: str, key: str, precision: int | None = 0, **kw) -> Option:
  return Option(key, lambda app: gr.Number(getattr(app.pipe.cfg.sampling, key), label=label,
                                           precision=precision, elem_id=key, **kw))


def _choice(label: str, key: str, choices: Sequence[str]) -> Option:
  return Option(key, lambda app: gr.Dropdown(list(choices), value=getattr(app.pipe.cfg.sampling, key),
                                             label=label, elem_id=key))


def _text(label: str, key: str, parse: Callable[[str], Any], show: Callable[[Any], str]) -> Option:
  """A free-text value (blank: None)."""
  return Option(key, lambda app: gr.Textbox(show(getattr(app.pipe.cfg.sampling, key)), label=label,
                                            elem_id=key),
                lambda value: parse(value.strip()) if value and value.strip() else None)


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",")]
  except ValueError:
    raise InputError(f"distill timesteps {text!r}: give integers separated by commas, e.g. "
                     "1000,750,500,250") from None


def advanced_options() -> list[Option]:
  """The "advanced" accordion, top to bottom. One more option is one more line here (and, if it
  is no sampling field, the place in `App.generate` that reads it)."""
  return [
      _number("frames (4k+1; N references need ≥ 4N+1; more than the model's: a long video of "
              "chained windows)", "frames"),
      _number("height (multiple of 16)", "height"),
      _number("width (multiple of 16)", "width"),
      _number("denoising steps", "steps", minimum=1),
      _number("guidance (classifier-free; 1: off, one branch)", "guidance", precision=None),
      _number("shift (flow shift of the schedule)", "shift", precision=None),
      _choice("sampler (distill: a step-distilled model, e.g. with the lightx2v LoRA)", "sampler",
              configs.SAMPLERS),
      _text("distill timesteps", "distill_timesteps", _int_list,
            lambda steps: ",".join(map(str, steps))),
      _number("distill shift", "distill_shift", precision=None),
      _choice("step cache (docs/sampling.md: Fast sampling)", "cache", configs.CACHES),
      _number("cache threshold (empty: the mode's default; 0: never skip)", "cache_threshold",
              precision=None),
      _text("MagCache calibration curve (JSON of sample.py --calibrate)", "cache_calibration",
            str, lambda path: path or ""),
      Option("loras", lambda app: gr.CheckboxGroup(
          list(app.loras), value=[], label="LoRAs (python -m a2jax.app --lora FILE[:STRENGTH])",
          elem_id="loras", visible=bool(app.loras))),
  ]


def page_error(message: str) -> gr.Error:
  """A message shown in the page until closed; the console gets one line, not a traceback."""
  print(f"request refused: {message}", file=sys.stderr)
  return gr.Error(message, duration=None, print_exception=False)


def reference_image(label: str, elem_id: str) -> gr.Image:
  """A reference slot (a file path). gradio opens an upload before the handler runs; an unreadable
  one shows `preprocess.load_image`'s message in the page. (Wrapped, not subclassed: a subclass
  makes gradio write a .pyi stub beside this file.)"""
  image = gr.Image(type="filepath", label=label, elem_id=elem_id, height=IMAGE_HEIGHT,
                   sources=["upload", "clipboard"])
  gradio_preprocess = image.preprocess

  def checked(payload):
    try:
      return gradio_preprocess(payload)
    except (OSError, ValueError):
      try:
        preprocess.load_image(payload.path)
      except InputError as e:
        raise page_error(f"{label}: {e}") from None
      raise

  image.preprocess = checked
  return image


def sampling_config(base: configs.SamplingConfig, values: dict[str, Any]) -> configs.SamplingConfig:
  """`base` with the values that name its fields; a ConfigError names a bad one."""
  fields = {f.name for f in dataclasses.fields(configs.SamplingConfig)}
  raw = {**configs.to_dict(base), **{k: v for k, v in values.items() if k in fields}}
  return configs.build(configs.SamplingConfig, raw, "sampling")


def read_references(paths: Sequence[str | None], background: str | None
                    ) -> tuple[list[np.ndarray], np.ndarray | None]:
  """Uploaded files (empty slots skipped) → RGB images; an unreadable one is an InputError."""
  refs = [preprocess.load_image(p) for p in paths if p]
  return refs, (preprocess.load_image(background) if background else None)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """[−1, 1] → uint8, as the references reach the VAE."""
  return np.round((np.asarray(pixels) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


class App:
  """The pipeline (kept for the app's life), the LoRAs offered, the output folder and one request's
  work. `loras` maps a label to a `LoadedLoRA`; each chosen set gets its own pipeline (merged
  transformer, shared encoders), kept like the base one."""

  def __init__(self, pipe, out_dir: pathlib.Path, loras: dict[str, Any] | None = None):
    self.pipe, self.out_dir, self.loras = pipe, out_dir, dict(loras or {})
    self._pipes = {(): pipe}
    self._numbers = itertools.count(1)

  def pipeline_with(self, labels: Sequence[str]):
    """The pipeline with the LoRAs of `labels` merged (in the order offered)."""
    chosen = tuple(label for label in self.loras if label in set(labels or ()))
    if chosen not in self._pipes:
      self._pipes[chosen] = self.pipe.with_loras([self.loras[label] for label in chosen])
    return self._pipes[chosen]

  def generate(self, refs: Sequence[str | None], background: str | None, prompt: str,
               negative_prompt: str, options: dict[str, Any],
               progress: Callable[[int, int], None] | bool = False
               ) -> tuple[str, list[np.ndarray], str]:
    """One request → (mp4 path, the references as the model saw them, a status line). `refs` and
    `background` are image files (None: an empty slot), `options` the values of the `Option`s by
    key, `progress(step, total)` is called from inside the denoising loop. Input is checked
    before the model runs; every problem is an A2JaxError."""
    if not prompt or not prompt.strip():
      raise InputError("the prompt is empty: describe the video to generate")
    sampling = sampling_config(self.pipe.cfg.sampling, options)
    references, bg = read_references(refs, background)
    if not references and bg is None:
      raise InputError("no reference images: upload at least one subject, object or background")
    self.pipe.family.check(sampling, len(references) + (bg is not None))
    seen, _ = self.pipe.reference_images(references, bg, sampling.height, sampling.width)
    from a2jax import long_video
    from a2jax.pipeline import Request
    start = time.perf_counter()
    pipe = self.pipeline_with(options.get("loras") or ())
    request = Request(prompt, references, bg, negative_prompt)
    path = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._numbers):04d}" \
                          f"-seed{sampling.seed}.mp4"
    timings = {"compile": 0.0}
    if sampling.frames > long_video.window_frames(sampling, self.pipe.cfg.sampling.frames):
      # Longer than the model's window: chained windows, decoded into the mp4 as they come.
      chained = long_video.LongElementsPipeline(pipe)
      latents = chained.latents([request], sampling, progress=progress, timings=timings)
      drop = chained.frames_to_drop(request.num_refs, sampling)
      video.write_mp4(path, (chunk[0] for chunk in chained.decode_stream(latents, drop)),
                      sampling.fps)
      frames = sampling.frames - drop
    else:
      result = pipe.generate([request], sampling=sampling, progress=progress)
      video.write_mp4(path, result.frames[0], sampling.fps)
      timings, frames = result.timings, result.frames.shape[1]
    seconds = time.perf_counter() - start
    print(f"wrote {path}", file=sys.stderr)
    status = (f"{frames} frames of {sampling.height}×{sampling.width} in {seconds:.1f} s "
              f"(compile {timings['compile']:.1f} s) → `{path}`")
    return str(path), list(to_uint8(seen)), status


def examples() -> list[list[Any]]:
  """Rows of (references…, background, prompt) from a2jax/app_examples/examples.json."""
  rows = []
  for raw in json.loads((EXAMPLES_DIR / "examples.json").read_text()):
    refs = [str(EXAMPLES_DIR / r) for r in raw["refs"]]
    refs += [None] * (REFERENCE_SLOTS - len(refs))
    rows.append([*refs, str(EXAMPLES_DIR / raw["background"]), raw["prompt"]])
  return rows


def build_ui(app: App):
  """The page: references, prompt, negative prompt, seed, the advanced accordion; the video, the
  references as the model saw them, a status line."""
  defaults = app.pipe.cfg.sampling
  with gr.Blocks(title="a2jax: SkyReels-A2 elements-to-video") as demo:
    gr.Markdown("# a2jax: elements to video\nReferences (subjects / objects in order, then a "
                "background; any may be empty, at least one given) and a prompt → a video.")
    with gr.Row():
      with gr.Column():
        with gr.Row():
          ref_inputs = [reference_image(f"subject / object {k + 1}", f"ref{k}")
                        for k in range(REFERENCE_SLOTS)]
          background = reference_image("background", "background")
        prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
        negative = gr.Textbox(defaults.negative_prompt if defaults.negative_prompt is not None
                              else app.pipe.family.default_negative_prompt, label="negative prompt", lines=2,
                              elem_id="negative_prompt")
        options = [_number("seed (the same seed gives the same video)", "seed")]
        widgets = [options[0].widget(app)]
        with gr.Accordion("advanced", open=False, elem_id="advanced"):
          options += advanced_options()
          widgets += [o.widget(app) for o in options[1:]]
      with gr.Column():
        out_video = gr.Video(label="video", elem_id="out_video", autoplay=True)
        seen = gr.Gallery(label="the references as the model saw them (padded / cropped)",
                          elem_id="seen_refs", columns=4, height="auto")
        status = gr.Markdown(elem_id="status")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
    gr.Examples(examples(), [*ref_inputs, background, prompt], label="examples")

    def generate(progress=gr.Progress(), *values):
      # gradio passes the progress tracker by its position, then the inputs below in order
      n = REFERENCE_SLOTS
      refs, (bg, text, negative_prompt), settings = values[:n], values[n:n + 3], values[n + 3:]
      progress(0, desc="encoding / compiling")
      report = lambda step, total: progress((step, total), desc="denoising", unit="steps")
      try:
        values = {o.key: o.parse(v) for o, v in zip(options, settings)}
        return app.generate(refs, bg, text, negative_prompt, values, report)
      except A2JaxError as e:
        raise page_error(str(e)) from None

    button.click(generate, [*ref_inputs, background, prompt, negative, *widgets],
                 [out_video, seen, status], api_name="generate")
  return demo


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m a2jax.app", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, type=pathlib.Path, help="converted a2jax folder "
                 "(python -m convert_weights release --src RELEASE --dst FOLDER)")
  p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("out/app"),
                 help="where the videos are written (default out/app)")
  p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: "
                 "this machine only; reach a remote one through an SSH tunnel)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--share", action="store_true", help="also a public gradio.live link (needs "
                 "internet)")
  p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                 help="a LoRA file the page offers (repeat for several; strength default 1)")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. "
                 "sampling.steps=30 (the page's defaults) or transformer.attention=splash")
  return p.parse_args(argv)


def read_loras(specs: Sequence[str], cfg: configs.TransformerConfig) -> dict[str, Any]:
  """`FILE[:STRENGTH]` specs → {label: LoadedLoRA}, read and checked at start. The file formats are
  the converters' (convert_weights/lora.py: they need its name tables); like sample.py, the app is
  an entry point and reads them there, the library takes the loaded LoRAs."""
  if not specs:
    return {}
  from convert_weights import lora
  loaded = {}
  for spec in specs:
    path, strength = lora.parse_spec(spec)
    loaded[f"{path.name} ×{strength:g}"] = lora.read_lora(path, cfg, strength)
  return loaded


def load_app(folder: pathlib.Path, out_dir: pathlib.Path, overrides: Sequence[str] = (),
             lora_specs: Sequence[str] = ()) -> App:
  """The pipeline of a converted folder on a mesh of this host's devices (the config's mesh)."""
  import jax
  from a2jax import checkpoints, distributed, families, pipeline, sharding
  if distributed.multi_process_environment() or jax.process_count() > 1:
    raise InputError("the web app runs as one process, and this is one of several (a pod slice or "
                     "a multi-process launch): start it on a single host, or sample on the pod "
                     "with sample.py --jobs")
  pipeline.check_folder(folder)
  cfg = checkpoints.read_config(folder, overrides)
  families.require_references(cfg, str(folder))
  loras = read_loras(lora_specs, cfg.transformer)
  for lora in loras.values():
    for note in lora.notes:
      print(f"lora: {note}", file=sys.stderr)
  pipe = pipeline.A2Pipeline.from_folder(folder, mesh=sharding.make_mesh(cfg.mesh),
                                         overrides=overrides)
  return App(pipe, out_dir, loras)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  app = load_app(args.checkpoint, args.out_dir, args.overrides, args.lora)
  args.out_dir.mkdir(parents=True, exist_ok=True)
  print(f"videos go to {args.out_dir.resolve()}", file=sys.stderr)
  demo = build_ui(app)
  demo.queue(default_concurrency_limit=1).launch(
      server_name=args.host, server_port=args.port, share=args.share,
      allowed_paths=[str(args.out_dir.resolve())], show_error=False)
  return 0


if __name__ == "__main__":
  sys.exit(run_main(main))
