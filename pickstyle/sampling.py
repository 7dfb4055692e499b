"""The sampling schema: ``params.sample``, ``evaluate.sample``, the ``stylize`` flags and the served model's
override columns all come from :class:`Sample` (re-exported by :mod:`pickstyle.config`)."""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from pickstyle.config_base import Section

#: Wan2.1's default negative prompt (the reference code's "null text" for CFG and CS-CFG).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


#: Guidance modes of :class:`~pickstyle.model.pipeline.PickStylePipeline` (its module docstring has the formulas).
Guidance = Literal["none", "cfg", "cfg_joint", "cs_cfg", "cs_cfg_apg"]
#: Schedulers :func:`~pickstyle.model.schedulers.make_scheduler` builds.
Scheduler = Literal["unipc", "dpmpp", "euler"]
GUIDANCE_MODES: tuple[str, ...] = get_args(Guidance)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


class Sample(Section):
    """Sampling (Context-Style CFG): the one schema of ``params.sample``, ``evaluate.sample``, the ``stylize``
    flags (:func:`pickstyle.cli.add_sample_flags`) and the served model's override columns
    (:func:`pickstyle.serving.model_signature`). Each field's description is its ``--help`` text."""

    steps: int | None = Field(default=None, description="denoising steps (default: the profile's)")
    guidance: Guidance = Field(default="cs_cfg", description="guidance mode")
    t_guide: float | None = Field(
        default=None, description="text (style) guidance scale t_g (default: the profile's)"
    )
    c_guide: float | None = Field(
        default=None, description="context (video) guidance scale c_g (0 = plain CFG; default: the profile's)"
    )
    skip: int = Field(default=0, description="start from the source latent noised to step k of the steps")
    scheduler: Scheduler = Field(default="dpmpp", description="sampling scheduler")
    shift: float = Field(default=16.0, description="sampling timestep shift")
    negative_prompt: str | None = Field(
        default=None, description='the null text (default: Wan\'s negative prompt; "" for none)'
    )
    batched: bool = Field(
        default=True,
        description="run the guidance predictions as one batch (--no-batched: one by one, less memory)",
    )
    cache_threshold: float = Field(
        default=0.0, description="step-cache threshold on the calibrated distance (0 = no cache)"
    )
    cache_warmup: int = Field(default=1, ge=1, description="first steps the step cache always computes")
    guidance_every: int = Field(
        default=2,
        ge=1,
        description="CS-CFG: all three predictions every k-th step, guidance directions reused in between "
        "(1 = exact; 2 costs what CFG does, bench/RESULTS.md)",
    )
    guidance_reuse: Literal["all", "context"] = Field(
        default="all", description="what the steps in between reuse: all (compute ε_c only) or context"
    )
    adapter_scale: float = Field(default=1.0, description="LoRA scale (0 = the base model)")
    device: str = Field(default="auto", description="cpu, cuda, cuda:1, ... (auto: CUDA when present)")
    window_overlap: int = Field(
        default=4,
        ge=0,
        description="long videos: frames shared by consecutive windows of one latent, averaged every step",
    )

    # A NaN scale or zero steps would "work" and write a garbage video: reject them, naming the field, in the
    # short form the CLI turns into "--c-guide: must be finite".
    @field_validator("t_guide", "c_guide", "shift", "cache_threshold", "adapter_scale")
    @classmethod
    def _finite(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:  # evaluate.sample: null = the profile's value
            return value
        if not math.isfinite(value):
            raise PydanticCustomError("not_finite", "must be finite")
        if info.field_name == "shift" and value <= 0:
            raise PydanticCustomError("out_of_range", "must be > 0")
        if info.field_name in ("t_guide", "c_guide", "cache_threshold") and value < 0:
            raise PydanticCustomError("out_of_range", "must be >= 0")
        return value

    @field_validator("steps")
    @classmethod
    def _some_steps(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise PydanticCustomError("out_of_range", "must be >= 1")
        return value

    @field_validator("skip")
    @classmethod
    def _skip_below_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        steps = info.data.get("steps")  # absent when steps itself was invalid (that error is reported)
        if value is None:
            return value
        if value < 0:
            raise PydanticCustomError("out_of_range", "must be >= 0")
        if steps is not None and value >= steps:
            raise PydanticCustomError("out_of_range", "must be < steps ({steps})", {"steps": steps})
        return value


def _all_optional(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """A subclass of ``model`` whose every field defaults to None ("not set here"), with the same descriptions
    and validators: derived, so a field added to ``model`` appears here too."""
    fields = {
        key: (field.annotation | None, Field(default=None, description=field.description))
        for key, field in model.model_fields.items()
    }
    derived = create_model(name, __base__=model, __module__=__name__, **fields)
    derived.__doc__ = doc
    return derived


#: ``evaluate.sample``: only what differs from ``sample``. A null (or absent) field takes ``sample``'s value
#: (whose null ``steps``, ``t_guide`` and ``c_guide`` are the active profile's ``sample_*``; resolved by
#: :class:`Params`, so every stage reads plain values).
EvalSample = _all_optional(
    Sample,
    "EvalSample",
    "``evaluate.sample``: only what differs from ``sample`` (a null field takes ``sample``'s value).",
)
