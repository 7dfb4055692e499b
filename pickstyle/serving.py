"""The registered model's Python side: the MLflow pyfunc :class:`PickStyleModel`, its signature and input example.

A request is a table, one video per row: the video as a server-side path (``video``) or as base64-encoded bytes
(``video_b64``, any container PyAV reads), a ``prompt``, and optional sampling overrides. Each row answers one
string: the path of the mp4 written, or, with ``return_bytes``, the mp4 itself in base64, so a remote client of
``mlflow models serve`` needs no shared disk. Errors a client can fix (no video, bad base64, an unreadable
video, an invalid override) raise an ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` whose message says what
was wrong; the scoring server returns it as the JSON ``message`` of an HTTP 400.

``pickstyle.register`` saves this class as a models-from-code entry; the rendering is :mod:`pickstyle.stylize`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from pydantic import ValidationError

from pickstyle.config import Params, Sample, error_lines, parse_params
from pickstyle.data.video import encode_video
from pickstyle.errors import PickstyleError
from pickstyle.files import resolve_device
from pickstyle.model.adapters import AdapterSet
from pickstyle.model.components import backbone_path, load_pipeline
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.stylize import oriented_size, read_fitted, render_fitted


def _mlflow_type(annotation: Any) -> str:
    """The MLflow column type of a :class:`~pickstyle.config.Sample` field's annotation."""
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return "string"
    return {int: "long", float: "double", bool: "boolean", str: "string"}[annotation]


#: Per-row overrides accepted by :meth:`PickStyleModel.predict` (besides the video, prompt and output): every
#: :class:`~pickstyle.config.Sample` field (the one sampling schema), plus the seed and a frame limit.
OVERRIDE_COLUMNS: dict[str, str] = {
    **{
        name: _mlflow_type(field.annotation)
        for name, field in Sample.model_fields.items()
        if name != "device"
    },
    "seed": "long",
    "max_frames": "long",
}


class ServingError(PickstyleError):
    """A request row cannot be served (no video, bad base64, invalid override); the message names the row."""


def model_signature() -> ModelSignature:
    """Inputs: ``video`` (path) or ``video_b64``, ``prompt``, optional ``output``, ``return_bytes`` and sampling
    overrides; output: one string per row (the mp4 path, or the base64 mp4 with ``return_bytes``)."""
    inputs = [
        ColSpec("string", "video", required=False),
        ColSpec("string", "video_b64", required=False),
        ColSpec("string", "prompt"),
        ColSpec("string", "output", required=False),
        ColSpec("boolean", "return_bytes", required=False),
    ]
    inputs += [ColSpec(kind, name, required=False) for name, kind in OVERRIDE_COLUMNS.items()]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("string", "output")]))


def example_clip(frames: int = 5, height: int = 32, width: int = 48) -> bytes:
    """A tiny moving gradient as mp4 bytes: the input example, so the serving example stylizes a real clip."""

    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([(x * 5 + t * 8) % 256, (y * 7) % 256, ((x + y) * 3 + t * 16) % 256], axis=-1)
    return encode_video(rgb.astype(np.uint8), fps=8.0)


def input_example() -> pd.DataFrame:
    """One row with an embedded clip (base64), answered in base64: works against any server, local or remote."""
    return pd.DataFrame(
        {
            "video_b64": [base64.b64encode(example_clip()).decode("ascii")],
            "prompt": ["anime style. a wolf walking in the snow"],
            "return_bytes": [True],
            "steps": [2],
        }
    )


def _present(value: Any) -> bool:
    if value is None:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _client_error(row: int, err: Exception) -> MlflowException:
    """One readable line for the client (the scoring server turns it into the HTTP 400's ``message``)."""
    if isinstance(err, ValidationError):  # "c_guide: must be finite", not pydantic's multi-line report
        text = "; ".join(error_lines(err))
    else:
        text = str(err).strip().replace("\n", "; ")
    return MlflowException(f"row {row}: {text}", error_code=INVALID_PARAMETER_VALUE)


class PickStyleModel(mlflow.pyfunc.PythonModel):
    """Stylize videos with a registered adapter: ``predict(DataFrame[video | video_b64, prompt, ...]) -> [str]``.

    The pipeline (backbone + adapter) is loaded once, on the first call, and reused.
    """

    def load_context(self, context: Any) -> None:

        artifacts = context.artifacts
        self.adapter_dir = Path(artifacts["adapter"])
        self.adapters = AdapterSet.open(self.adapter_dir)  # one adapter, or one per style
        self.params: Params = parse_params(
            json.loads(Path(artifacts["params"]).read_text()), "registered params"
        )
        backbone = artifacts.get("backbone")
        if backbone is None:  # real profiles: the backbone stays where it was recorded
            backbone = backbone_path(self.params)
        self.backbone_dir = Path(backbone)
        self._pipe = None

    def _pipeline(self, sample: Sample, prompt: str) -> Any:
        """The pipeline, loaded on the first call, with the adapter ``prompt`` asks for active (of per-style
        adapters, the style it names: :meth:`AdapterSet.pick`)."""
        if self._pipe is None:
            self._pipe = load_pipeline(
                self.backbone_dir,
                device=resolve_device(sample.device),
                dtype=self.params.model.dtype,
                pipeline_cls=PickStylePipeline,
            )
            self.adapters.load(self._pipe, scale=sample.adapter_scale)
        self.adapters.activate(self._pipe, prompt, sample.adapter_scale)
        return self._pipe

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        """Stylize each row's video with its ``prompt``; one string per row, in row order.

        The video is ``video`` (a path on the server) or ``video_b64`` (the file's bytes in base64). The answer is
        the written mp4's path (``output``, or ``<stem>.pickstyle.mp4`` in a fresh temporary folder), or with
        ``return_bytes`` the mp4 in base64 (written to ``output`` too when given). Optional columns (and MLflow
        inference ``params``) override the registered sampling settings: steps, guidance, t_guide, c_guide,
        skip, scheduler, shift, negative_prompt, adapter_scale, seed, max_frames.

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` naming the row and the cause, for any input error.
        """
        outputs = []
        for index, row in enumerate(model_input.to_dict(orient="records")):
            settings = {**(params or {}), **{k: v for k, v in row.items() if _present(v)}}
            try:
                outputs.append(self._serve_row(settings))
            except (PickstyleError, ValidationError, ValueError) as err:
                raise _client_error(index, err) from None
            except Exception as err:  # a bug, out of memory, ...: still one line that says what happened
                raise MlflowException(
                    f"row {index}: stylizing failed: {type(err).__name__}: {err}", error_code=INTERNAL_ERROR
                ) from err
        return outputs

    def _serve_row(self, settings: dict[str, Any]) -> str:
        if not settings.get("prompt"):
            raise ServingError("needs a prompt")
        if settings.get("video") and settings.get("video_b64"):
            raise ServingError("give either video (a path) or video_b64 (the bytes), not both")
        with tempfile.TemporaryDirectory(prefix="pickstyle-serve-") as tmp:
            if settings.get("video_b64"):
                try:
                    data = base64.b64decode(settings["video_b64"], validate=True)
                except (binascii.Error, ValueError) as err:
                    raise ServingError(f"video_b64 is not valid base64 ({err})") from None
                video = Path(tmp) / "input"
                video.write_bytes(data)
            elif settings.get("video"):
                video = Path(settings["video"])
            else:
                raise ServingError(
                    "needs a video: a server-side path (video) or the bytes in base64 (video_b64)"
                )
            return_bytes = bool(settings.get("return_bytes", False))
            output = settings.get("output")
            if output:
                output = Path(output)
            elif return_bytes:
                output = Path(tmp) / "output.mp4"
            else:
                stem = "video" if settings.get("video_b64") else video.stem
                output = Path(tempfile.mkdtemp(prefix="pickstyle-")) / f"{stem}.pickstyle.mp4"
            try:
                written = self._stylize_row(video, output, settings)
            except PickstyleError as err:
                if settings.get("video_b64"):  # name the client's column, not the server's temporary file
                    raise ServingError(str(err).replace(str(video), "video_b64")) from None
                raise
            if return_bytes:
                return base64.b64encode(written.read_bytes()).decode("ascii")
            return str(written)

    def _stylize_row(self, video: Path, output: Path, settings: dict[str, Any]) -> Path:

        sample_fields = set(Sample.model_fields)
        overrides = {k: v for k, v in settings.items() if k in sample_fields}
        # validate the overrides (names, types, ranges) with the field names in the message
        sample = Sample.model_validate({**self.params.sample.model_dump(), **overrides})
        seed = int(settings.get("seed", 0))
        max_frames = int(settings["max_frames"]) if settings.get("max_frames") else None
        profile = self.params.active

        height, width = oriented_size(video, profile.height, profile.width, "auto")
        fitted, fps, region = read_fitted(video, height, width, "crop", max_frames)
        pipe = self._pipeline(sample, settings["prompt"])
        return render_fitted(
            pipe,
            fitted,
            fps,
            region,
            output,
            settings["prompt"],
            sample,
            seed,
            length=profile.frames,
            model_fps=profile.fps,
        )


__all__ = [
    "OVERRIDE_COLUMNS",
    "PickStyleModel",
    "ServingError",
    "example_clip",
    "input_example",
    "model_signature",
]
