"""`pickstyle app`: the request checks and model listing without a browser, then the real page in headless
chromium (a separate `pickstyle app` process on a free port): upload, pick a registered model, stylize, download;
a bad upload's message."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from pickstyle import register, tracking
from pickstyle.app import (
    BASE_MODEL,
    AppError,
    check_upload,
    model_choices,
    resolve_model,
    sample_from,
    stylize_upload,
)
from pickstyle.config import parse_params
from pickstyle.data.video import read_video, write_video
from pickstyle.model.adapters import WEIGHT_NAME
from pickstyle.register import RegistryError
from tests.procs import free_port, group
from tests.projects import random_adapter, without_outside_tracking

MODEL = "pickstyle-app-test"
PROMPT = "anime style. a portrait of a woman"
CHROMIUM = Path("/usr/bin/chromium")
#: The closed network refuses every connection but loopback: nothing of chromium's own may try one.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clip(path: Path, frames: int = 9, height: int = 64, width: int = 96, fps: float = 8.0) -> Path:
    """A moving gradient written by the project's own video writer."""
    t = np.linspace(0, 1, frames)[:, None, None, None]
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    shape = (frames, height, width, 1)
    rgb = np.concatenate([np.broadcast_to(c, shape) for c in (x, (y + t) % 1, (x * y + t) % 1)], axis=-1)
    return write_video(path, (rgb * 255).astype(np.uint8), fps)


def _pan(path: Path, frames: int = 9, height: int = 64, width: int = 96, fps: float = 8.0) -> Path:
    """A real-looking clip: a camera pan over a photograph no stage trains on (the moving gradient without it)."""
    from pickstyle.data.footage import heldout_images, pan_clip

    image = dict(heldout_images()).get("grace_hopper")
    if image is None:
        return _clip(path, frames, height, width, fps)
    return write_video(path, pan_clip(image, frames, height, width), fps)


@pytest.fixture(scope="module")
def project(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    """A project folder: the tiny backbone, one adapter folder, and that adapter registered as ``MODEL``
    (version 1, @champion and @challenger) in its own sqlite registry; ``params.yaml`` points at all of it."""
    root = tmp_path_factory.mktemp("app-project")
    models = root / "models"
    shutil.copytree(tiny_backbone, models / "backbone")
    random_adapter(tiny_backbone, models / "adapter")
    tree = {
        "paths": {
            "models": str(models),
            "eval": str(root / "eval"),
            "mlflow_db": str(root / "mlflow.db"),
            "mlflow_artifacts": str(root / "mlartifacts"),
        },
        "register": {"model_name": MODEL},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    params = parse_params(tree)
    with pytest.MonkeyPatch.context() as mp:
        without_outside_tracking(mp)
        mp.chdir(root)
        register.register(params)
        yield SimpleNamespace(root=root, params=params, adapter=models / "adapter")


# --- without a browser ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("none", "no video: upload one first"),
        ("text", "notavideo.mp4: not a readable video"),
        ("empty", "empty.mp4: empty file (0 bytes)"),
        ("suffix", "notes.txt: wrong format (.txt): upload a video (.mp4, .mov"),
        ("still", "still.mp4: too short (1 frame): a video needs at least 2 frames"),
    ],
)
def test_bad_uploads_are_one_readable_line(kind: str, message: str, tmp_path: Path) -> None:
    path = {
        "none": None,
        "text": tmp_path / "notavideo.mp4",
        "empty": tmp_path / "empty.mp4",
        "suffix": tmp_path / "notes.txt",
        "still": tmp_path / "still.mp4",
    }[kind]
    if kind in ("text", "suffix"):
        path.write_text("this is not a video\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "still":
        _clip(path, frames=1)
    with pytest.raises(AppError) as err:
        check_upload(path)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text and str(tmp_path) not in text  # the user's file name, not the server's copy


def test_a_video_upload_is_described(tmp_path: Path) -> None:
    upload = check_upload(_clip(tmp_path / "clip.mp4"))
    assert (upload.frames, upload.height, upload.width, upload.fps) == (9, 64, 96, pytest.approx(8.0))
    assert upload.describe() == "clip.mp4: 9 frames, 96x64 at 8 fps (1.1 s)"


def test_choices_list_every_alias_the_adapter_folders_and_the_base_model(project) -> None:
    values = [value for _, value in model_choices(project.params)]
    assert values == [
        f"models:/{MODEL}@champion",
        f"models:/{MODEL}@challenger",
        str(project.adapter),
        BASE_MODEL,
    ]


def test_no_registry_lists_only_the_base_model_and_creates_no_database(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    params = parse_params({"paths": {"models": str(tmp_path / "models"), "mlflow_db": str(db)}})
    assert model_choices(params) == [("base model, no adapter", BASE_MODEL)]
    assert not db.exists()


def test_resolve_model(project, tmp_path: Path) -> None:
    adapter, backbone = resolve_model(f"models:/{MODEL}@champion", project.params, tmp_path / "dl")
    assert (Path(adapter) / WEIGHT_NAME).is_file() and (Path(backbone) / "transformer").is_dir()
    assert Path(adapter).is_relative_to(tmp_path / "dl")
    assert resolve_model(str(project.adapter), project.params) == (str(project.adapter), None)
    assert resolve_model(BASE_MODEL, project.params) == (None, None)
    with pytest.raises(AppError, match="nope: no such adapter folder"):
        resolve_model(str(tmp_path / "nope"), project.params)
    with pytest.raises(AppError, match="not an adapter folder"):
        resolve_model(str(tmp_path), project.params)
    with pytest.raises(AppError, match="no model"):
        resolve_model("", project.params)
    with pytest.raises(RegistryError, match="cannot load the registered model"):
        resolve_model(f"models:/{MODEL}@nosuchalias", project.params, tmp_path / "dl2")


def test_sampling_defaults_are_the_profiles_and_bad_values_are_named(project) -> None:
    base = project.params.sample
    sample = sample_from(base, {"steps": None, "t_guide": None})
    assert (sample.steps, sample.t_guide, sample.c_guide) == (3, 1.0, 0.0)  # the tiny profile's
    sample = sample_from(base, {"steps": 2, "guidance": "cfg", "negative_prompt": "  "})
    assert (sample.steps, sample.guidance, sample.negative_prompt) == (2, "cfg", None)
    with pytest.raises(AppError, match=r"^c_guide: must be finite$"):
        sample_from(base, {"c_guide": math.inf})
    with pytest.raises(AppError, match=r"steps: must be >= 1"):
        sample_from(base, {"steps": 0})
    with pytest.raises(AppError, match=r"guidance: "):
        sample_from(base, {"guidance": "loud"})


def test_a_failed_run_leaves_nothing_behind(project, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    clip = _clip(tmp_path / "clip.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    cases = [
        (bad, f"models:/{MODEL}@champion", AppError),
        (clip, f"models:/{MODEL}@nosuchalias", RegistryError),  # fails after the run folder was made
        (clip, str(tmp_path / "missing"), AppError),
    ]
    for video, choice, error in cases:
        with pytest.raises(error):
            stylize_upload(video, PROMPT, choice, {}, params=project.params, workdir=workdir)
        assert list(workdir.iterdir()) == []
    with pytest.raises(AppError, match="no style prompt"):
        stylize_upload(clip, " ", BASE_MODEL, {}, params=project.params, workdir=workdir)


# --- in a real browser ---------------------------------------------------------------------------------------


def _wait_until_served(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pickstyle app exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"pickstyle app not serving after {timeout} s:\n{log.read_text()[-3000:]}")


def _chromium_or_skip() -> None:
    if CHROMIUM.exists():
        return
    why = f"{CHROMIUM} is missing and could not be installed (`make test` runs `make browser`: apt-get, as root)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser test")
    pytest.skip(why)


#: Records every text the page's progress trackers show (the run can be over before a poll would see it).
WATCH_PROGRESS = """
window.__progress = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('[data-testid="status-tracker"]')) {
    const text = el.textContent.trim();
    if (text && window.__progress.at(-1) !== text) window.__progress.push(text);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.mark.slow
def test_the_page_stylizes_an_upload_in_chromium(project, tmp_path: Path) -> None:
    """Upload a 9-frame clip, pick ``@challenger``, 2 steps, Stylize: the progress shows the steps, the download
    is a 9-frame video that is not the source, the left player is the source; a text file named .mp4 gets the
    readable message and leaves no run folder; the page asks nothing of any host but the app."""
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    clip = _pan(tmp_path / "clip.mp4")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app_tmp = tmp_path / "app-tmp"  # the app's temporary folders (its runs, Gradio's cache)
    app_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV)}
    env["TMPDIR"] = str(app_tmp)
    exe = Path(sys.executable).with_name("pickstyle")
    cmd = [str(exe), "app", "--params", str(project.root / "params.yaml"), "--port", str(port)]
    log = tmp_path / "app.log"
    with (
        log.open("w") as sink,
        group(cmd, cwd=project.root, env=env, stdout=sink, stderr=subprocess.STDOUT) as proc,
    ):
        _wait_until_served(url, proc, log)
        with sync_playwright() as pw:
            profile = tmp_path / "chromium-profile"  # empty: a fresh user-data-dir
            profile.mkdir()
            browser = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                accept_downloads=True,
                viewport={"width": 1280, "height": 1000},
            )
            try:
                page = browser.new_page()
                elsewhere: list[str] = []
                page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(url) else None)
                page.goto(url)
                _stylize_in_page(page, clip, tmp_path, log)
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
                _bad_upload_in_page(page, tmp_path, app_tmp)
                page.screenshot(path=str(tmp_path / "app-error.png"), full_page=True)
            finally:
                browser.close()
    assert [u for u in elsewhere if not u.startswith(("data:", "blob:"))] == []
    print(f"screenshots: {tmp_path / 'app.png'} {tmp_path / 'app-error.png'}")


def _stylize_in_page(page, clip: Path, tmp_path: Path, log: Path) -> None:
    page.wait_for_function("document.querySelector('#model input')?.value.includes('models:/')")
    page.click("#model input")
    page.get_by_role("option", name=f"models:/{MODEL}@challenger").click()
    assert page.input_value("#steps input") == "3"  # the tiny profile's default
    page.fill("#steps input", "2")
    page.fill("#prompt textarea", PROMPT)
    page.set_input_files("#source input[type=file]", str(clip))
    page.get_by_text("clip.mp4: 9 frames, 96x64 at 8 fps").wait_for()
    page.evaluate(WATCH_PROGRESS)
    page.click("#run")
    try:
        page.wait_for_selector("#result video[src]", timeout=180_000)
    except Exception:
        raise AssertionError(f"no result video; the app's log:\n{log.read_text()[-3000:]}") from None
    with page.expect_download() as download:
        page.click("#download")
    result = tmp_path / "downloaded.mp4"
    download.value.save_as(result)
    frames, fps = read_video(result)
    assert frames.shape == (9, 64, 96, 3) and fps == pytest.approx(8.0)
    source_src = page.get_attribute("#fitted video", "src")
    with urllib.request.urlopen(urllib.request.Request(source_src), timeout=30) as response:
        source, _ = read_video(response.read())
    assert source.shape == frames.shape
    original, _ = read_video(clip)
    assert np.abs(source.astype(float) - original).mean() < 3  # the left player is the source
    assert np.abs(frames.astype(float) - original).mean() > 10  # the right one is not
    seen = page.evaluate("window.__progress")
    assert any("steps" in text and "/2" in text for text in seen), seen  # the denoising steps, live
    assert "9 frames, 96x64 at 8 fps" in page.inner_text("#status")


def _bad_upload_in_page(page, tmp_path: Path, app_tmp: Path) -> None:
    from playwright.sync_api import expect

    bad = tmp_path / "notavideo.mp4"
    bad.write_text("this is not a video\n")
    page.click("#source button[aria-label='Clear']")
    page.set_input_files("#source input[type=file]", str(bad))
    page.get_by_text("notavideo.mp4: not a readable video").first.wait_for()
    page.click("#run")  # the run refuses it too, and writes nothing
    expect(page.get_by_text("notavideo.mp4: not a readable video")).to_have_count(2)
    runs = list(app_tmp.glob("pickstyle-app-*/run-*"))
    assert len(runs) == 1, runs  # the good run only: the refused one left nothing
