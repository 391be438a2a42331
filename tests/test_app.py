"""The web app (a2jax/app.py) in a real browser (headless Chromium through Playwright) and through
gradio_client, on the tiny random release: a video that decodes with the asked frames and size,
the references as the model saw them, and bad input as a message in the page."""

import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from a2jax import app as app_module
from a2jax import video
from a2jax.errors import InputError

CHROMIUM = "/usr/bin/chromium"
REFS = 2                        # one subject + the background
FRAMES, HEIGHT, WIDTH = 13, 32, 48
OUT_FRAMES = FRAMES - 4 * REFS  # the reference frames are dropped
EXAMPLE = app_module.examples()[0]
SUBJECT, BACKGROUND = EXAMPLE[0], EXAMPLE[app_module.REFERENCE_SLOTS]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def random_lora_file(folder: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """A LoRA of the tiny release's transformer with random factors (both non-zero), ComfyUI names."""
  import jax
  from a2jax import checkpoints
  from a2jax.models import lora
  from a2jax.models.transformer import init_params
  from convert_weights.lora import write_lora
  cfg = checkpoints.read_config(folder).transformer
  tree = lora.init_lora(init_params(cfg, jax.random.key(0)), lora.DEFAULT_TARGETS, 4,
                        jax.random.key(1))
  tree = jax.tree.map(lambda a: np.asarray(a) + 0.5, tree)
  return write_lora(tree, 4.0, path, "comfyui")


@pytest.fixture(scope="module")
def server(release, tmp_path_factory):
  """(URL of the app serving the tiny release, its output folder, the App); closed after the
  module. The app offers one LoRA at strength 0.5."""
  out_dir = tmp_path_factory.mktemp("app_out")
  lora_file = random_lora_file(release[1], out_dir.parent / "style.safetensors")
  app = app_module.load_app(release[1], out_dir, [
      f"sampling.frames={FRAMES}", f"sampling.height={HEIGHT}", f"sampling.width={WIDTH}",
      "sampling.steps=2"], [f"{lora_file}:0.5"])
  demo = app_module.build_ui(app)
  port = free_port()
  demo.queue(default_concurrency_limit=1).launch(
      server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
      allowed_paths=[str(out_dir)], quiet=True)
  try:
    yield f"http://127.0.0.1:{port}/", out_dir, app
  finally:
    demo.close()


@pytest.fixture(scope="module")
def browser():
  from playwright import sync_api as playwright
  if not pathlib.Path(CHROMIUM).exists():
    pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
  with playwright.sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM,
                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield chromium
    chromium.close()


def open_page(browser, url: str):
  page = browser.new_page(viewport={"width": 1400, "height": 1000})
  start = time.perf_counter()
  page.goto(url)
  page.wait_for_selector("#generate")
  print(f"page load {time.perf_counter() - start:.1f} s")
  return page


def check_video(path, out_dir: pathlib.Path) -> None:
  frames = video.read_mp4(path)
  assert frames.shape == (OUT_FRAMES, HEIGHT, WIDTH, 3)
  written = sorted(out_dir.glob("*.mp4"))
  assert written and not list(out_dir.glob(".*partial*"))
  assert any(np.array_equal(video.read_mp4(w), frames) for w in written)


def test_browser_generates_a_video(server, browser, tmp_path):
  url, out_dir, _ = server
  page = open_page(browser, url)
  page.locator("#prompt textarea").fill(EXAMPLE[-1])
  page.locator("#ref0 input[type=file]").set_input_files(SUBJECT)
  page.locator("#background input[type=file]").set_input_files(BACKGROUND)
  page.wait_for_selector("#ref0 img")
  page.wait_for_selector("#background img")
  start = time.perf_counter()
  page.locator("#generate").click()
  page.wait_for_function(
      "() => { const v = document.querySelector('#out_video video');"
      " return v && v.src.includes('.mp4') && v.readyState >= 1; }", timeout=600_000)
  print(f"first video {time.perf_counter() - start:.1f} s")
  src = page.eval_on_selector("#out_video video", "v => v.src")
  downloaded = tmp_path / "downloaded.mp4"
  downloaded.write_bytes(page.request.get(src).body())
  check_video(downloaded, out_dir)
  assert page.locator("#seen_refs img").count() == REFS
  assert "frames of" in page.locator("#status").inner_text()
  page.screenshot(path=str(tmp_path / "app.png"), full_page=True)


@pytest.mark.parametrize("prompt, refs, message", [
    ("", [SUBJECT], "the prompt is empty"),
    ("a red star", [], "no reference images"),
    ("a red star", ["broken.png"], "cannot read image"),
])
def test_browser_shows_bad_input(server, browser, tmp_path, prompt, refs, message):
  (tmp_path / "broken.png").write_bytes(b"not an image")
  refs = [tmp_path / r if r == "broken.png" else r for r in refs]
  page = open_page(browser, server[0])
  page.locator("#prompt textarea").fill(prompt)
  for path in refs:
    page.locator("#ref0 input[type=file]").set_input_files(path)
  page.locator("#generate").click()
  page.get_by_text(message).first.wait_for(timeout=120_000)
  assert "Traceback" not in page.content()


def call(client, *, frames=FRAMES, height=HEIGHT):
  from gradio_client import handle_file
  return client.predict(
      handle_file(SUBJECT), None, None, handle_file(BACKGROUND), EXAMPLE[-1], "", 3,
      frames, height, WIDTH, 2, 5.0, 8.0, "unipc", "1000,750,500,250", 5.0, "none", None, "", [],
      api_name="/generate")  # the page's controls, in order


def test_gradio_client(server):
  from gradio_client import Client
  client = Client(server[0], verbose=False)
  try:
    result, seen, status = call(client)
    check_video(result, server[1])
    assert len(seen) == REFS and "frames of" in status
    for kw, message in [({"frames": 14}, "4k+1"), ({"height": 40}, "multiples of 16")]:
      with pytest.raises(Exception, match=re.escape(message)):
        call(client, **kw)
  finally:
    client.close()  # its heartbeat thread, before the server goes


def test_generate_reports_progress_from_the_loop(server):
  """What gr.Progress is fed: (steps done, total) from inside the compiled loop, to the end."""
  _, out_dir, app = server
  calls = []
  path, seen, _ = app.generate([SUBJECT, None, None], BACKGROUND, EXAMPLE[-1], "",
                               {"seed": 5}, lambda *a: calls.append(a))
  assert calls == [(1, 2), (2, 2)]
  assert [s.shape for s in seen] == [(HEIGHT, WIDTH, 3)] * REFS
  check_video(path, out_dir)


def test_frames_beyond_the_window_make_a_long_video(server):
  """21 frames from a 13-frame model: 3 chained windows (a2jax.long_video), progress over all of
  their steps, streamed into the mp4."""
  _, out_dir, app = server
  calls = []
  path, _, status = app.generate([SUBJECT, None, None], BACKGROUND, EXAMPLE[-1], "",
                                 {"seed": 5, "frames": 21}, lambda *a: calls.append(a))
  assert calls[-1] == (6, 6) and len(calls) == 6
  assert video.read_mp4(path).shape == (21 - 4 * REFS, HEIGHT, WIDTH, 3)
  assert status.startswith(f"{21 - 4 * REFS} frames of")


def test_lora_and_fast_sampling_options(server):
  """A LoRA chosen in the page merges into its own pipeline (kept for later requests); the distill
  sampler and a step cache are plain sampling options."""
  _, out_dir, app = server
  (label,) = app.loras
  assert label == "style.safetensors ×0.5"
  request = ([SUBJECT, None, None], BACKGROUND, EXAMPLE[-1], "")
  base, _, _ = app.generate(*request, {"seed": 5})
  styled, _, _ = app.generate(*request, {"seed": 5, "loras": [label]})
  assert not np.array_equal(video.read_mp4(base), video.read_mp4(styled))
  assert len(app._pipes) == 2 and app.pipeline_with([label]) is app.pipeline_with([label])
  distilled, _, status = app.generate(*request, {"seed": 5, "sampler": "distill", "guidance": 1.0,
                                                 "distill_timesteps": [1000, 500]})
  check_video(distilled, out_dir)
  cached, _, _ = app.generate(*request, {"seed": 5, "cache": "fbcache", "cache_threshold": 0.0})
  assert np.array_equal(video.read_mp4(cached), video.read_mp4(base))  # threshold 0: exact path
  with pytest.raises(InputError, match="distill timesteps"):
    app_module._int_list("1000,x")


@pytest.mark.parametrize("folder, message", [("none", "does not exist"), ("empty", "lacks")])
def test_cli_bad_checkpoint_is_one_error_line(tmp_path, folder, message):
  (tmp_path / "empty").mkdir()
  proc = subprocess.run([sys.executable, "-m", "a2jax.app", "--checkpoint", str(tmp_path / folder)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
  assert message in proc.stderr


def test_multi_host_refuses_to_start(release, tmp_path, monkeypatch):
  # a pod slice's environment (each host sees it before jax.distributed starts)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
  with pytest.raises(InputError, match="runs as one process"):
    app_module.load_app(release[1], tmp_path)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  import jax
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # jax.distributed already started
  with pytest.raises(InputError, match="runs as one process"):
    app_module.load_app(release[1], tmp_path)
