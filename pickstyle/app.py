"""``pickstyle app``: a web demo (Gradio) of ``pickstyle stylize`` on 127.0.0.1.

Upload a video, choose a registered model (``models:/NAME@ALIAS`` from the MLflow registry the params point to),
an adapter folder or the base model, write a style prompt and set the sampling (defaults: ``params.sample``
resolved with the active profile's values, as for ``pickstyle stylize``); the page shows the denoising progress,
then the source (fitted to the model's frame, as the model sees it) beside the stylized video, and a download of
the result. The rendering is :func:`pickstyle.stylize.stylize_file`, unchanged; this module only checks the
request, resolves the model and lays out the page.

A bad upload (a file type that is no video, an unreadable or empty file, a still) or a bad setting is answered
with one readable line (``gr.Error``) naming what was wrong; a failed run leaves no file behind. One run at a
time (the queue's concurrency limit is 1: a model fills the accelerator). Gradio's usage analytics are off (set
before gradio is imported); the page loads nothing from outside the server (its fonts are served locally).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import av
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from pickstyle.config import Params, Sample, error_lines
from pickstyle.data.video import VideoError, read_video, write_video
from pickstyle.errors import PickstyleError
from pickstyle.model.adapters import STYLES_NAME, WEIGHT_NAME, AdapterError, AdapterSet
from pickstyle.register import load_registered
from pickstyle.stylize import oriented_size, read_fitted, stylize_file
from pickstyle.tracking import tracking_uri

logger = logging.getLogger(__name__)

#: File types the upload accepts (containers PyAV/FFmpeg decode); anything else is "wrong format".
VIDEO_SUFFIXES = (
    ".mp4",
    ".mov",
    ".m4v",
    ".webm",
    ".mkv",
    ".avi",
    ".gif",
    ".mpg",
    ".mpeg",
    ".ogv",
    ".wmv",
    ".flv",
    ".3gp",
    ".ts",
)
#: Fewer decodable frames than this is a still, not a video.
MIN_FRAMES = 2
#: The model choice that stylizes with the backbone alone.
BASE_MODEL = "base"
#: The sampling settings shown first; the other :class:`~pickstyle.config.Sample` fields are under "more".
MAIN_SETTINGS = ("steps", "guidance", "t_guide", "c_guide")
#: Sample fields whose empty text box means "the default" (the null text: Wan's negative prompt).
EMPTY_IS_DEFAULT = ("negative_prompt",)
DEFAULT_PROMPT = "anime style. a wolf walking in the snow"


class AppError(PickstyleError):
    """A request the demo cannot run (bad upload, bad setting, unknown model); the message says what to fix."""


@dataclass(frozen=True)
class Upload:
    """What the demo knows of an uploaded video after :func:`check_upload`."""

    name: str
    height: int
    width: int
    fps: float
    frames: int | None  # from the container's metadata (None when it does not say)

    def describe(self) -> str:
        """One line for the page, e.g. ``clip.mp4: 9 frames, 96x64 at 8 fps (1.1 s)``."""
        size = f"{self.width}x{self.height} at {self.fps:g} fps"
        if self.frames is None:
            return f"{self.name}: {size}"
        return f"{self.name}: {self.frames} frames, {size} ({self.frames / self.fps:.1f} s)"


def _frame_count(path: Path) -> int | None:
    with av.open(str(path)) as container:
        return container.streams.video[0].frames or None


def check_upload(path: str | Path | None) -> Upload:
    """Check an uploaded file before any model is loaded.

    Raises:
        AppError: no file, a file type that is no video (``wrong format``), an empty or unreadable file, or
            fewer than :data:`MIN_FRAMES` frames (``too short``); the message names the file, not the server's
            copy of it.
    """
    if path is None or not str(path):
        raise AppError("no video: upload one first (mp4, mov, webm, gif, ...)")
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        kind = path.suffix or "no extension"
        raise AppError(f"{name}: wrong format ({kind}): upload a video ({', '.join(VIDEO_SUFFIXES)})")
    try:
        frames, fps = read_video(path, max_frames=MIN_FRAMES)
        count = _frame_count(path)
    except VideoError as err:
        raise AppError(str(err).replace(str(path), name)) from None
    if len(frames) < MIN_FRAMES:
        raise AppError(
            f"{name}: too short ({len(frames)} frame): a video needs at least {MIN_FRAMES} frames (a still is not)"
        )
    return Upload(name, frames.shape[1], frames.shape[2], fps, count)


# --- which model ---------------------------------------------------------------------------------------------


def registered_choices(params: Params) -> list[str]:
    """``models:/NAME@ALIAS`` of every alias in the registry the params point to (a version with no alias:
    ``models:/NAME/VERSION`` of the newest), champions first.

    An sqlite registry that does not exist yet lists nothing (and is not created); an unreachable server lists
    nothing, with a warning in the log.
    """
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    try:
        models = MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    except (MlflowException, OSError) as err:
        logger.warning("no registered models listed: %s: %s", uri, err)
        return []
    out = []
    for model in sorted(models, key=lambda m: m.name):
        aliases = sorted(model.aliases or {}, key=lambda a: (a != "champion", a))
        if aliases:
            out += [f"models:/{model.name}@{alias}" for alias in aliases]
        elif model.latest_versions:
            newest = max(int(v.version) for v in model.latest_versions)
            out.append(f"models:/{model.name}/{newest}")
    return out


def adapter_choices(params: Params) -> list[str]:
    """Adapter folders directly under ``paths.models``: one adapter (``pytorch_lora_weights.safetensors``) or one
    per style (``pickstyle_styles.json``)."""
    models = Path(params.paths.models)
    found = {p.parent for name in (WEIGHT_NAME, STYLES_NAME) for p in models.glob(f"*/{name}")}
    return [str(p) for p in sorted(found)]


def model_choices(params: Params) -> list[tuple[str, str]]:
    """The model dropdown's ``(label, value)`` pairs: registered models, adapter folders, then the base model."""
    choices = [(f"{uri}  (registered)", uri) for uri in registered_choices(params)]
    choices += [(f"{folder}  (adapter folder)", folder) for folder in adapter_choices(params)]
    return [*choices, ("base model, no adapter", BASE_MODEL)]


def resolve_model(
    choice: str | None, params: Params, download_to: Path | None = None
) -> tuple[str | None, str | None]:
    """``(adapter folder, backbone folder)`` for a model choice; ``None`` = the base model / the params' backbone.

    A ``models:/`` (or ``runs:/``) URI is downloaded (into ``download_to``) by
    :func:`~pickstyle.register.load_registered`; anything else is an adapter folder.

    Raises:
        AppError: no choice, a folder that does not exist or holds no adapter.
        RegistryError: a registered model that cannot be loaded (unknown name or alias, no registry).
    """
    choice = (choice or "").strip()
    if not choice:
        raise AppError("no model: choose a registered model, an adapter folder or the base model")
    if choice == BASE_MODEL:
        return None, None
    if choice.startswith(("models:/", "runs:/")):
        info = load_registered(choice, params=params, dst_path=download_to)
        return info["adapter_dir"], info["backbone_dir"]
    folder = Path(choice).expanduser()
    if not folder.is_dir():
        raise AppError(f"{choice}: no such adapter folder (nor a models:/NAME@ALIAS)")
    try:
        AdapterSet.open(folder)
    except AdapterError as err:
        raise AppError(str(err)) from None
    return str(folder), None


# --- sampling settings ---------------------------------------------------------------------------------------


def sample_from(base: Sample, values: dict[str, Any]) -> Sample:
    """``base`` (the params' resolved ``sample``) with the page's values, validated together.

    An empty field (``None``, or blank text for :data:`EMPTY_IS_DEFAULT`) keeps ``base``'s value.

    Raises:
        AppError: one line naming each bad setting, e.g. ``c_guide: must be finite``.
    """
    overrides = {}
    for name, value in values.items():
        if value is None or (name in EMPTY_IS_DEFAULT and isinstance(value, str) and not value.strip()):
            continue
        overrides[name] = value
    try:
        return Sample.model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:
        raise AppError("; ".join(error_lines(err))) from None


def _field_kind(annotation: Any) -> Any:
    """A :class:`Sample` field's type without ``| None`` (``Literal[...]``, int, float, bool or str)."""
    if get_origin(annotation) in (Union, UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _setting(gr: Any, name: str, value: Any) -> Any:
    """The control of one :class:`Sample` field, typed as its ``--flag`` is (its description is the hint)."""
    field = Sample.model_fields[name]
    kind = _field_kind(field.annotation)
    common = {"label": name, "info": field.description, "elem_id": name}
    if get_origin(kind) is Literal:
        return gr.Dropdown(choices=list(get_args(kind)), value=value, **common)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if kind in (int, float):
        return gr.Number(value=value, precision=0 if kind is int else None, **common)
    return gr.Textbox(value=value or "", placeholder="default", **common)


# --- one run -------------------------------------------------------------------------------------------------


def write_fitted_source(
    video: str | Path, output: Path, params: Params, fit: str = "crop", max_frames=None
) -> Path:
    """The source as the model sees it (:func:`~pickstyle.stylize.read_fitted` at the size ``stylize`` picks),
    at the source's fps: the left half of ``stylize --side-by-side``, as its own browser-playable mp4."""
    profile = params.active
    height, width = oriented_size(Path(video), profile.height, profile.width, "auto")
    fitted, fps, (rows, cols) = read_fitted(Path(video), height, width, fit, max_frames)
    return write_video(output, fitted[:, rows, cols], fps)


def stylize_upload(
    video: str | Path | None,
    prompt: str,
    choice: str | None,
    settings: dict[str, Any],
    *,
    params: Params,
    workdir: Path,
    seed: int = 0,
    fit: str = "crop",
    max_frames: int | None = None,
) -> tuple[Path, Path]:
    """Check the request, stylize the upload with :func:`~pickstyle.stylize.stylize_file`, write the fitted
    source beside it.

    Everything a run writes is in one fresh folder under ``workdir``, removed if the run fails (nothing
    half-written is left behind); a registered model's download is removed when the run ends.

    Returns:
        ``(fitted source mp4, stylized mp4)``.

    Raises:
        PickstyleError: the upload, a setting, the model or the video cannot be used (a readable message).
    """
    upload = check_upload(video)
    if not (prompt or "").strip():
        raise AppError(f"no style prompt: write one, e.g. {DEFAULT_PROMPT!r}")
    sample = sample_from(params.sample, settings)
    if max_frames is not None and max_frames < 1:
        raise AppError(f"max frames: must be >= 1 (or empty for all), got {max_frames}")
    run = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        adapter, backbone = resolve_model(choice, params, run / "model")
        stem = Path(upload.name).stem
        result = stylize_file(
            video,
            run / f"{stem}.pickstyle.mp4",
            prompt.strip(),
            params=params,
            sample=sample,
            adapter=adapter,
            backbone=backbone,
            seed=seed,
            fit=fit,
            max_frames=max_frames,
        )
        source = write_fitted_source(video, run / f"{stem}.source.mp4", params, fit, max_frames)
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(run / "model", ignore_errors=True)
    return source, result


def clear_old_runs(workdir: Path, keep: Path | None = None) -> None:
    """Remove the folders of earlier runs (Gradio has copied their videos into its own cache by then)."""
    for folder in workdir.glob("run-*"):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _readable(err: Exception, video: str | None) -> str:
    """The error as one line that names the user's file, not the server's copy of it."""
    text = str(err).strip().replace("\n", "; ")
    if video:
        text = text.replace(str(video), Path(video).name)
    return text


# --- the page ------------------------------------------------------------------------------------------------


def _gradio() -> Any:
    """Import gradio with its usage analytics off (it reads the variable when imported)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise AppError("gradio is not installed: run `make install`") from None
    return gradio


def _header(params: Params) -> str:
    p = params.active
    return (
        "# PickStyle: video style transfer\n"
        f"Profile **{params.profile}**: the model sees {p.frames}-frame windows at {p.width}x{p.height}, "
        f"{p.fps:g} fps; any video is fitted to that and the result keeps the source's fps and duration. "
        "Defaults are the profile's sampling settings (`params.sample`)."
    )


def build_app(params: Params, workdir: Path) -> Any:
    """The Gradio page (``gr.Blocks``) for ``params``; runs write under ``workdir``."""
    gr = _gradio()
    defaults = params.sample.model_dump()
    with gr.Blocks(title="PickStyle", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_header(params))
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="source video", sources=["upload"], height=260, elem_id="source")
                info = gr.Markdown(elem_id="upload-info")
            with gr.Column(scale=1):
                model = gr.Dropdown(
                    label="model",
                    info="a registered model (models:/NAME@ALIAS), an adapter folder, or the base model",
                    allow_custom_value=True,
                    elem_id="model",
                )
                prompt = gr.Textbox(label="style prompt", value=DEFAULT_PROMPT, elem_id="prompt")
                with gr.Row():
                    main = {name: _setting(gr, name, defaults[name]) for name in MAIN_SETTINGS}
                    seed = gr.Number(label="seed", value=0, precision=0, info="noise seed", elem_id="seed")
                with gr.Accordion("more sampling settings", open=False):
                    more = {name: _setting(gr, name, defaults[name]) for name in defaults if name not in main}
                    fit = gr.Radio(
                        ["crop", "pad"], value="crop", label="fit", info="cover + crop, or letterbox"
                    )
                    max_frames = gr.Number(
                        label="max frames", precision=0, info="empty: all", elem_id="max_frames"
                    )
                run = gr.Button("Stylize", variant="primary", elem_id="run")
        with gr.Row():
            source_out = gr.Video(label="source, as the model sees it", interactive=False, elem_id="fitted")
            result_out = gr.Video(label="stylized", interactive=False, elem_id="result")
        with gr.Row():
            status = gr.Markdown(elem_id="status")
            download = gr.DownloadButton("Download the stylized video", interactive=False, elem_id="download")
        settings = {**main, **more}

        def describe(path: str | None) -> str:
            if path is None:
                return ""
            try:
                return check_upload(path).describe()
            except PickstyleError as err:
                raise gr.Error(_readable(err, path), print_exception=False) from None

        # gr.Progress(track_tqdm=True): the pipeline's tqdm step bar shows on the page ("3/8 steps") while it runs
        def stylize(values: dict, progress=gr.Progress(track_tqdm=True)) -> tuple:
            clip = values[video]
            start = time.perf_counter()
            try:
                source, result = stylize_upload(
                    clip,
                    values[prompt],
                    values[model],
                    {name: values[c] for name, c in settings.items()},
                    params=params,
                    workdir=workdir,
                    seed=int(values[seed] or 0),
                    fit=values[fit],
                    max_frames=values[max_frames],
                )
            except PickstyleError as err:
                raise gr.Error(_readable(err, clip), print_exception=False) from None
            except Exception as err:  # a bug, out of memory, ...: still one line that says what happened
                logger.exception("stylizing failed")
                raise gr.Error(f"stylizing failed: {type(err).__name__}: {_readable(err, clip)}") from None
            clear_old_runs(workdir, keep=result.parent)
            frames, fps = read_video(result)
            used = "the base model" if values[model] == BASE_MODEL else f"`{values[model]}`"
            done = (
                f"{len(frames)} frames, {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps "
                f"in {time.perf_counter() - start:.0f} s with {used}"
            )
            return str(source), str(result), gr.DownloadButton(value=str(result), interactive=True), done

        def list_models() -> Any:
            choices = model_choices(params)
            return gr.Dropdown(choices=choices, value=choices[0][1])

        video.upload(describe, video, info)
        video.clear(lambda: "", None, info)
        inputs = {video, prompt, model, seed, fit, max_frames, *settings.values()}
        run.click(stylize, inputs, [source_out, result_out, download, status])
        demo.load(list_models, None, model)
    return demo.queue(default_concurrency_limit=1, max_size=16)


def launch(params: Params, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve the demo until interrupted (Ctrl-C); its run folder is removed afterwards.

    Args:
        params: the project params (profile, sampling defaults, models folder, MLflow registry).
        host: the address to listen on (``0.0.0.0``: every interface).
        port: the port.
        share: a public ``*.gradio.live`` link through Gradio's tunnel (needs the internet; off by default).
    """
    with tempfile.TemporaryDirectory(prefix="pickstyle-app-") as tmp:
        workdir = Path(tmp)
        demo = build_app(params, workdir)
        demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            allowed_paths=[str(workdir)],
            show_error=True,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
        )


__all__ = [
    "AppError",
    "Upload",
    "adapter_choices",
    "build_app",
    "check_upload",
    "launch",
    "model_choices",
    "registered_choices",
    "resolve_model",
    "sample_from",
    "stylize_upload",
]
