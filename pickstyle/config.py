"""Typed mirror of ``params.yaml``.

Every section is a pydantic model with ``extra="forbid"``, so a typo'd key fails on load with its dotted name
(``train.stpes: unknown key``). Top-level keys are the DVC stage names plus the shared ``profile``, ``seed``,
``paths``, ``model`` and ``profiles``. Each DVC stage lists only the keys it reads (see ``dvc.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pickstyle.config_base import ParamsError, Section
from pickstyle.sampling import (  # noqa: F401 (part of the config's interface)
    GUIDANCE_MODES,
    SCHEDULERS,
    WAN_NEGATIVE_PROMPT,
    EvalSample,
    Guidance,
    Sample,
    Scheduler,
)


class Paths(Section):
    """Where stages read and write, relative to the working directory (never to ``DVC_ROOT``)."""

    data: str = "data"
    models: str = "models"
    eval: str = "eval"
    #: MLflow tracking database (sqlite); made absolute when used.
    mlflow_db: str = "mlflow.db"
    #: MLflow artifact root; made absolute when used.
    mlflow_artifacts: str = "mlartifacts"


class TinyBackbone(Section):
    """Sizes of the tiny Wan2.1-VACE (the embedded default), pretrained by the ``pretrain`` stage.

    Chosen for a 2-core CPU (README "The tiny backbone"): a VAE with 2x spatial, 1x temporal compression to 6
    channels and a 4x4 transformer patch, so a 9x64x96 clip is 9x8x12 = 864 tokens; ~2.2 M parameters in all
    (under 10 MB on disk). A token carries ``vae_z_dim * prod(patch_size)`` latent values (here 96), which must
    stay below the width (heads x head_dim, here 128): ``proj_out`` maps the width to those values, so with more
    of them the predicted velocity spans only part of each token's latent space and flow-matching sampling can
    never remove the initial noise outside it (the old 16-channel VAE + 4x4 patch had 256 values on width 128:
    half of every latent stayed noise).
    """

    num_layers: int = 4
    vace_layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    num_attention_heads: int = 2
    attention_head_dim: int = 64
    ffn_dim: int = 256
    text_dim: int = 32
    freq_dim: int = 64
    #: Transformer patch (t, h, w) over the latent.
    patch_size: list[int] = Field(default_factory=lambda: [1, 4, 4])
    #: AutoencoderKLWan base channels (the encoder's; the decoder's too unless ``vae_decoder_base_dim`` is set).
    vae_base_dim: int = 8
    #: The decoder's base channels; null = ``vae_base_dim``. Wider: the pretrain stage's last phase trains a new
    #: decoder of this width on the frozen encoder, so the latent space the transformer learned stays (README "The
    #: tiny backbone": 16 channels, 2,000 steps, gave real footage 22.7 dB against the fine-tuned 8's 23.5).
    vae_decoder_base_dim: int | None = Field(default=None, ge=1)
    #: Latent channels (Wan: 16): the transformer's in/out channels.
    vae_z_dim: int = 6
    #: One entry per VAE level; ``len - 1`` 2x spatial downsamples (Wan: [1, 2, 4, 4], 8x).
    vae_dim_mult: list[int] = Field(default_factory=lambda: [1, 2])
    #: Which of those downsamples also halve time (Wan: [False, True, True], 4x).
    vae_temporal_downsample: list[bool] = Field(default_factory=lambda: [False])
    #: Encode and decode each frame on its own (needs no temporal downsample: set false with one). The causal
    #: temporal convolutions of a VAE with no temporal compression only degrade later frames (README "The tiny
    #: backbone": held-out real frames 24.4 dB frame-wise, 23.5 clip-wise).
    vae_framewise: bool = True
    text_layers: int = 2
    text_heads: int = 2
    text_ffn_dim: int = 64
    max_text_tokens: int = 32

    @model_validator(mode="after")
    def _vae_levels(self) -> TinyBackbone:
        if len(self.vae_temporal_downsample) != len(self.vae_dim_mult) - 1:
            raise ValueError("vae_temporal_downsample needs one entry per downsample (len(vae_dim_mult) - 1)")
        if self.vae_framewise and any(self.vae_temporal_downsample):
            raise ValueError(
                "vae_framewise needs a VAE without temporal downsampling (vae_temporal_downsample)"
            )
        if len(self.patch_size) != 3:
            raise ValueError("patch_size is (t, h, w)")
        values = self.vae_z_dim * math.prod(self.patch_size)
        width = self.num_attention_heads * self.attention_head_dim
        if values >= width:
            raise ValueError(
                f"patch_size {self.patch_size} x vae_z_dim {self.vae_z_dim} puts {values} latent values in a token "
                f"of width {width}: the transformer's output could not span them and sampling would leave noise in "
                "every latent; use a smaller patch or vae_z_dim, or a wider transformer (values < heads x head_dim)"
            )
        return self

    @property
    def vae_scale_spatial(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        return 2 ** sum(self.vae_temporal_downsample)


class Model(Section):
    """The backbone: built in-process for ``tiny``, read from a local diffusers-format folder otherwise."""

    #: Local diffusers-format Wan2.1-VACE folder (real profiles). Ignored by ``tiny``.
    path: str | None = None
    #: ``auto`` = bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tiny: TinyBackbone = Field(default_factory=TinyBackbone)


class Profile(Section):
    """What a profile fixes: the backbone kind and the clip geometry, plus the defaults that depend on the backbone.

    The defaults are the paper's (LoRA r = alpha = 128 on the VACE blocks' self-attention q/k/v, 3000 steps,
    AdamW lr 5.6e-4 under the bell weighting at shift 5, gradient checkpointing, 20 sampling steps at t_g = 5,
    c_g = 4); the tiny profile overrides them in ``params.yaml``. A ``null`` in the matching stage key
    (``train.{steps,lr,lr_schedule,shift,weighting,gradient_checkpointing,lora_targets}``, ``sample.{steps,t_guide,
    c_guide}``) takes the profile's value, for ``pickstyle stylize``, the served model and the evaluation alike.
    """

    backbone: Literal["tiny", "wan-1.3b", "wan-14b"]
    #: Frames per clip, 4n+1 (the VAE compresses time 4x plus the first frame).
    frames: int
    #: Multiples of 16 (8x VAE, 2x patch).
    height: int
    width: int
    fps: int = 16
    lora_rank: int = 128
    lora_alpha: float = 128.0
    #: peft target regex (fullmatched) when ``train.lora_targets`` is null. Paper: the self-attention q/k/v of
    #: the VACE context blocks only.
    lora_targets: str = r"vace_blocks\.\d+\.attn1\.to_(?:q|k|v)"
    #: Optimizer steps of ``train`` when ``train.steps`` is null (paper: 3000).
    train_steps: int = Field(default=3000, ge=1)
    #: AdamW learning rate, timestep shift and loss weighting of ``train`` where those keys are null (paper:
    #: 5.6e-4, shift 5, the mid-schedule bell). A bell is 0 at σ = 1, where sampling starts and a style is decided
    #: (the colours of a sepia clip come from the context alone there): the tiny profile weights every σ alike.
    train_lr: float = Field(default=5.6e-4, gt=0)
    train_shift: float = Field(default=5.0, gt=0)
    train_weighting: Literal["bell", "none"] = "bell"
    #: Learning-rate schedule of ``train`` where ``train.lr_schedule`` is null: ``constant`` after the warm-up (the
    #: reference) or ``cosine`` decay to a tenth (the tiny profile: a batch of one clip at one σ leaves a constant-lr
    #: adapter wherever its last steps pushed it, ±0.3 dB between neighbouring step counts).
    train_lr_schedule: Literal["constant", "cosine"] = "constant"
    #: Latent frames per training step when ``train.frame_window`` is null (null = the whole clip, the paper):
    #: a random window of each clip, so the same time buys more steps. The tiny VAE keeps time (a latent frame is
    #: a frame); Wan's compresses it 4x after a 1-frame first latent, which a window starting later lacks, so the
    #: real profiles train on whole clips.
    train_frame_window: int | None = Field(default=None, ge=1)
    #: Gradient checkpointing (main and VACE blocks) when ``train.gradient_checkpointing`` is null: at 81x480x832
    #: the 1.3B keeps ~105 GiB of activations without it, ~15-20 GiB with it (docs/method.md §4).
    gradient_checkpointing: bool = True
    #: Sampling where ``sample`` (and ``evaluate.sample``) leave them null: steps and the CS-CFG scales
    #: (paper: 20, 5, 4). The stylize command, the served model and the evaluation all use these.
    sample_steps: int = Field(default=20, ge=1)
    sample_t_guide: float = 5.0
    sample_c_guide: float = 4.0
    #: Motion variants per pair when ``clips.variants`` is null: training visits one per pair per epoch, a new
    #: one each epoch (the reference draws a fresh motion on every visit, over 57 epochs).
    clip_variants: int = Field(default=8, ge=1)
    #: Shared horizontal-flip probability when ``clips.flip_prob`` is null (the reference does not flip: 0).
    flip_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Chroma of the near-lossless clips when ``clips.chroma`` is null: ``444`` keeps full colour detail
    #: (the reference trains on RGB frames); ``420`` is smaller.
    chroma: Literal["420", "444"] = "444"
    #: How a built-in pair's styled clip is made when ``clips.style_render`` is null (see there): ``motion``
    #: (the paper: the styled image under the source's motion) or ``per_frame`` (the style applied to each
    #: rendered source frame, at the frame's own scale: what the evaluation's ground truth is).
    style_render: Literal["motion", "per_frame"] = "motion"
    #: What ``train`` makes when ``train.adapters`` is null: ``joint``, one adapter for every style, prompted by
    #: its caption (the paper), or ``per_style``, one adapter per style, picked by the style the prompt names
    #: (the tiny profile: its backbone learns one style per adapter, not five in one; README: The tiny backbone).
    adapters: Literal["joint", "per_style"] = "joint"

    @field_validator("frames")
    @classmethod
    def _frames_4n1(cls, v: int) -> int:
        if v < 1 or (v - 1) % 4:
            raise ValueError(f"must be 4n+1 (e.g. 9, 17, 81), got {v}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _mult16(cls, v: int) -> int:
        if v < 16 or v % 16:
            raise ValueError(f"must be a positive multiple of 16, got {v}")
        return v


#: The tiny profile's LoRA targets: every linear layer of the VACE blocks (self- and cross-attention, the
#: feed-forward and the hint projection). The paper's attn1 q/k/v alone cannot teach the tiny backbone a style
#: (README: The tiny backbone); the real profiles keep the paper's.
TINY_LORA_TARGETS = r"vace_blocks\.\d+\.(?:attn1\.to_(?:q|k|v|out\.0)|attn2\.to_(?:q|k|v|out\.0)|ffn\.net\.(?:0\.proj|2)|proj_out)"


#: Profile fields every stage that reads the profile depends on: the backbone kind and the clip geometry.
PROFILE_GEOMETRY = ("backbone", "frames", "height", "width", "fps")

#: ``(section, key)``: the profile field a null key takes (resolved once, by :class:`Params`).
PROFILE_DEFAULTS = {
    ("train", "adapters"): "adapters",
    ("train", "steps"): "train_steps",
    ("train", "lr"): "train_lr",
    ("train", "lr_schedule"): "train_lr_schedule",
    ("train", "shift"): "train_shift",
    ("train", "weighting"): "train_weighting",
    ("train", "gradient_checkpointing"): "gradient_checkpointing",
    ("train", "frame_window"): "train_frame_window",
    ("train", "lora_targets"): "lora_targets",
    ("clips", "variants"): "clip_variants",
    ("clips", "flip_prob"): "flip_prob",
    ("clips", "chroma"): "chroma",
    ("clips", "style_render"): "style_render",
    ("sample", "steps"): "sample_steps",
    ("sample", "t_guide"): "sample_t_guide",
    ("sample", "c_guide"): "sample_c_guide",
}

#: Profile fields read through a ``Params`` property where a section key is null (``lora_rank``, ``lora_alpha``).
PROFILE_PROPERTIES = {"train": ("lora_rank", "lora_alpha")}


def profile_fields(*sections: str) -> list[str]:
    """The profile fields a stage reading ``sections`` depends on: the geometry, then the defaults of those
    sections' null keys. ``dvc.yaml`` lists exactly these per stage (tests/flows/test_dvc.py), so tuning, say,
    ``sample_steps`` reruns the evaluation but not the clips, latents or training."""
    fields = list(PROFILE_GEOMETRY)
    for section in sections:
        fields += [f for (s, _), f in PROFILE_DEFAULTS.items() if s == section]
        fields += PROFILE_PROPERTIES.get(section, ())
    return fields


def _default_profiles() -> dict[str, Profile]:
    return {
        "tiny": Profile(
            backbone="tiny",
            frames=9,
            height=64,
            width=96,
            fps=8,
            lora_rank=32,
            lora_alpha=32.0,
            lora_targets=TINY_LORA_TARGETS,
            train_steps=650,
            train_frame_window=3,
            train_lr=2e-3,
            train_shift=12.0,
            train_weighting="none",
            train_lr_schedule="cosine",
            gradient_checkpointing=False,
            sample_steps=3,
            sample_t_guide=1.0,
            sample_c_guide=0.0,
            clip_variants=2,
            flip_prob=0.5,
            chroma="444",
            style_render="per_frame",
            adapters="per_style",
        ),
        "wan-1.3b": Profile(backbone="wan-1.3b", frames=81, height=480, width=832, fps=16),
        "wan-14b": Profile(backbone="wan-14b", frames=81, height=480, width=832, fps=16),
    }


class Pairs(Section):
    """The ``pairs`` stage: (source image, style image, caption) pairs as WebDataset shards."""

    #: ``builtin`` = scikit-image photos x procedural styles; the others import a folder/manifest at ``root``.
    source: Literal["builtin", "omniconsistency", "pickstyle_v1", "manifest"] = "builtin"
    #: Folder (or CSV/JSONL manifest file) for the importers.
    root: str | None = None
    #: Built-in styles to render (names from ``pickstyle.data.styles.STYLES``).
    styles: list[str] = Field(default_factory=lambda: ["anime", "sketch", "sepia", "pixel", "watercolor"])
    #: Built-in pairs per style (random crop/scale/flip of the photos).
    per_style: int = 48
    #: Side of the square built-in pair images, in pixels.
    size: int = 128
    #: A style image whose size differs from its source: ``resize`` it to the source, or ``reject`` the pair.
    on_size_mismatch: Literal["resize", "reject"] = "resize"
    #: Samples per shard.
    shard_size: int = 64


#: The reference's camera-motion mix (zoom in/out, four slides, rotate drawn twice as often): the default of both
#: the adapter's clips (``clips.motion_mix``, which adds the off-by-default extra motions) and pretraining's own.
REFERENCE_MOTION_MIX = {
    "zoom_in": 1.0,
    "zoom_out": 1.0,
    "slide_left": 1.0,
    "slide_right": 1.0,
    "slide_up": 1.0,
    "slide_down": 1.0,
    "rotate": 2.0,
}


class Clips(Section):
    """The ``clips`` stage: synthetic camera-motion clips with shared augmentation, and held-out test clips."""

    #: Motion variants rendered per pair (K); null = the profile's ``clip_variants`` (tiny 2, real 8). Training
    #: visits one variant per pair per epoch, a different one each epoch.
    variants: int | None = Field(default=None, ge=1)
    #: Relative weights of the moving motions (the reference mix by default; rotate drawn twice as often).
    motion_mix: dict[str, float] = Field(
        default_factory=lambda: {
            **REFERENCE_MOTION_MIX,
            "dolly": 0.0,
            "handheld": 0.0,
            "tilt": 0.0,
        }
    )
    #: Probability of a static clip (the reference: 0.2).
    static_prob: float = 0.2
    #: Source-only photometric augmentation (off: any colour change on the style image changes the style).
    source_photometric: bool = False
    #: Probability of a horizontal flip of *both* images before the motion (one shared draw); null = the
    #: profile's (tiny 0.5, real 0: the reference does not flip). [clips helper]
    flip_prob: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Shared random crop before the motion: side fraction kept, drawn in [crop_min, 1] (1.0 = off, as the
    #: reference). [clips helper]
    crop_min: float = Field(default=1.0, gt=0.0, le=1.0)
    #: H.264 quality: ``near_lossless`` (libx264, crf below, yuv420p) or ``lossless`` (libx264rgb, qp 0: exact RGB).
    quality: Literal["near_lossless", "lossless"] = "near_lossless"
    crf: int = 12
    #: Chroma subsampling of ``near_lossless`` clips; null = the profile's (444 on every profile: 4:2:0 halves
    #: the colour resolution, which costs 64x96 anime/pixel targets 9-11 dB against their exact frames).
    chroma: Literal["420", "444"] | None = None
    #: The styled clip of a *built-in* (procedural) pair: ``motion`` renders the style image under the source's
    #: camera motion (the paper's recipe, the only one for image pairs from a folder); ``per_frame`` applies the
    #: style function to each rendered source frame. A style's grain (pixel grid, outlines, paper, vignette) then
    #: sits at the frame's scale, anchored to the frame, as when a video is stylised frame by frame (the test
    #: clips' ground truth); a 128 px style image shown at 0.5-1x differs from that by 21 dB (pixel) to 26 dB
    #: (watercolor). Null = the profile's (tiny ``per_frame``, real ``motion``). Pairs from other sources always
    #: use ``motion``.
    style_render: Literal["motion", "per_frame"] | None = None
    #: Optional folder of real videos (mp4/mov/webm/gif) cut into "reconstruct." clips.
    reconstruct_dir: str | None = None
    #: Caption description used for reconstruction clips (a ``<video>.txt`` beside a video overrides it).
    reconstruct_description: str = "a real video clip"
    #: At most this many non-overlapping windows of ``frames`` frames per reconstruction video. [clips helper]
    reconstruct_max_windows: int = Field(default=4, ge=1)
    #: Held-out procedural test scenes with object motion (written to ``data/testclips``).
    test_clips: int = 10
    #: Validation scenes of the same kind (``data/valclips``: other seeds: other objects, paths, pans), for choosing
    #: settings without looking at the test clips: ``dvc exp run -S evaluate.split=val …`` (README: Tuning).
    val_clips: int = Field(default=10, ge=0)
    #: Moving cut-out objects per test scene.
    test_objects: int = 3
    #: Samples per shard.
    shard_size: int = 64
    #: Parallel render workers (Prefect task mapping).
    workers: int = 2
    #: ``thread`` (Prefect's default runner) or ``dask`` (a local cluster, or ``dask_address``).
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = None
    #: Clips in the preview grid.
    preview_clips: int = 6


class Pretrain(Section):
    """The ``pretrain`` stage: train the tiny backbone from scratch on data the project makes itself.

    Four phases, each resumable from ``<models>/.pretrain/``: the VAE (single frames, then short clips, on
    procedural images of every kind as well as the built-in photos), a latent set of clips, the transformer (main
    and VACE blocks) on a mix of tasks as Wan-VACE is pretrained (``task_mix``), then the VAE decoder. The
    ``holdout_styles`` never appear in any phase. Nothing here reads the ``clips`` section: tuning the adapter's
    motions does not invalidate the backbone.
    """

    seed: int = 0
    #: Built-in styles kept out of pretraining entirely (the adapter must learn them from nothing).
    holdout_styles: list[str] = Field(default_factory=lambda: ["sepia"])
    vae_frame_steps: int = Field(default=900, ge=0)
    vae_clip_steps: int = Field(default=700, ge=0)
    vae_batch: int = Field(default=8, ge=1)
    vae_lr: float = Field(default=2e-3, gt=0)
    vae_warmup_steps: int = Field(default=50, ge=0)
    #: Share of the VAE's images that are procedural (noise, gradients, patterns, shapes, strokes, jittered photo
    #: crops at any zoom: ``pickstyle/data/textures.py``); the rest are built-in photo clips and scenes.
    vae_texture_share: float = Field(default=0.3, ge=0, le=1)
    #: Clips in the transformer's latent set (each rendered once with its own motion, crop, task and style).
    clips: int = Field(default=2000, ge=8)
    steps: int = Field(default=9000, ge=0)
    batch_size: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    #: A second cosine cycle of the transformer (warm restart, new batches) after ``steps``: its own phase and
    #: checkpoint, so a longer pretraining resumes the first cycle (0 = none).
    refine_steps: int = Field(default=5000, ge=0)
    refine_lr: float = Field(default=4e-4, gt=0)
    #: AdamW weight decay of the transformer (the VAE and decoder phases use none).
    weight_decay: float = Field(default=0.01, ge=0)
    #: Training timestep shift of the pretraining (lower than the adapters' 5: small latents need less noise).
    shift: float = Field(default=3.0, gt=0)
    #: Relative weights of the transformer's tasks (as Wan-VACE: structure controls with free text):
    #: ``reconstruct`` "reconstruct. <desc>", RGB source context -> the source; ``control_style`` a structure
    #: control of the source (``controls``) + "<Style> style. <desc>" -> the styled clip; ``control_photo`` a
    #: control + the description -> the source; ``text_style`` / ``text_plain`` text-to-video (empty context) of
    #: the styled / plain clip. RGB context with a style prompt is never shown: the leak the adapters fix.
    task_mix: dict[str, float] = Field(
        default_factory=lambda: {
            "reconstruct": 0.3,
            "control_style": 0.3,
            "control_photo": 0.15,
            "text_style": 0.15,
            "text_plain": 0.1,
        }
    )
    #: Structure controls drawn for the control tasks (``pickstyle/data/controls.py``).
    controls: list[str] = Field(default_factory=lambda: ["grey", "edges", "blur", "downscaled"])
    #: Share of clips that are procedural scenes with moving cut-outs (the rest are photo crops with a motion).
    scene_share: float = Field(default=0.3, ge=0, le=1)
    #: Cut-out objects per procedural scene.
    scene_objects: int = Field(default=3, ge=0)
    #: Camera motions of the pretraining clips (pretrain's own: the ``clips`` stage's are the adapter's data).
    motion_mix: dict[str, float] = Field(default_factory=lambda: dict(REFERENCE_MOTION_MIX))
    static_prob: float = Field(default=0.2, ge=0, le=1)
    #: Probability that a caption is replaced by the sampler's "null text" (Wan's negative prompt), so CFG has an
    #: unconditional branch to contrast with.
    null_text_prob: float = Field(default=0.1, ge=0, le=1)
    #: Last phase: the VAE decoder alone (encoder frozen, so the latent space the transformer learned is kept)
    #: fine-tuned on clips with L1 + MSE; sharpens every decoded output.
    #: With ``model.tiny.vae_decoder_base_dim`` wider than the encoder, this phase trains that wider decoder from
    #: scratch instead (measured worse so far: README "The tiny backbone").
    decoder_steps: int = Field(default=300, ge=0)
    decoder_lr: float = Field(default=5e-4, gt=0)
    decoder_warmup_steps: int = Field(default=20, ge=0)
    #: Share of procedural images in the decoder phase's clips (``vae_texture_share`` is the VAE phase's).
    decoder_texture_share: float = Field(default=0.3, ge=0, le=1)
    log_every: int = Field(default=50, ge=1)
    #: Every phase checkpoints (model, optimizer, curve) every this many steps and at its end.
    checkpoint_every: int = Field(default=100, ge=1)
    device: str = "auto"

    @field_validator("task_mix")
    @classmethod
    def _known_tasks(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"reconstruct", "control_style", "control_photo", "text_style", "text_plain"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {sorted(known)}")
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return value


class Latents(Section):
    """The ``latents`` stage: VAE/text encodings cached once per clip."""

    shard_size: int = 64
    #: Encode on this device (``auto`` = CUDA when available).
    device: str = "auto"


class Train(Section):
    """The ``train`` stage: one explicit flow-matching loop over cached latents."""

    #: ``joint`` (one adapter for every style, the paper) or ``per_style`` (one adapter per style of the
    #: training data, each on that style's clips alone, in ``<models>/adapter/<style>/``); null = the profile's
    #: (tiny per_style, real joint).
    adapters: Literal["joint", "per_style"] | None = None
    #: Optimizer steps (of each adapter, with ``adapters: per_style``); null = the profile's ``train_steps``.
    steps: int | None = Field(default=None, ge=1)
    #: Clips per process per micro-batch.
    batch_size: int = 1
    #: Micro-batches whose gradients are summed per optimizer step: the effective batch is
    #: ``batch_size x grad_accum x processes`` (the paper's 32 on one GPU: grad_accum 32).
    grad_accum: int = Field(default=1, ge=1)
    #: AdamW learning rate; null = the profile's ``train_lr`` (tiny 2e-3, real the paper's 5.6e-4).
    lr: float | None = Field(default=None, gt=0)
    #: ``constant`` after the warm-up or ``cosine`` decay to a tenth at ``steps``; null = the profile's
    #: ``train_lr_schedule`` (tiny cosine, real the reference's constant).
    lr_schedule: Literal["constant", "cosine"] | None = None
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: Flow-matching timestep shift of the σ draws; null = the profile's ``train_shift`` (tiny 12, real the
    #: paper's 5).
    shift: float | None = Field(default=None, gt=0)
    #: Loss weighting over timesteps: ``bell`` (mid-schedule peak, as the reference) or ``none``; null = the
    #: profile's ``train_weighting`` (tiny none, real bell).
    weighting: Literal["bell", "none"] | None = None
    #: LoRA rank/alpha; null = the profile's default.
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    #: peft ``init_lora_weights`` (True = B zero, "gaussian", ...).
    lora_init: bool | Literal["gaussian", "pissa", "olora"] = True
    #: peft target regex (fullmatched); null = the profile's (real: the VACE blocks' self-attention q/k/v).
    lora_targets: str | None = None
    #: Probability that a training clip's caption is replaced by the null text (Wan's negative prompt, the
    #: sampler's ∅): the adapter then also learns the unconditional branch CFG contrasts with.
    caption_dropout: float = Field(default=0.1, ge=0, le=1)
    #: Train on a random window of this many latent frames of each clip (the same window of target, context
    #: and noise; a step costs less: 3 of 9 frames about half); null = the profile's
    #: ``train_frame_window`` (tiny 3 of 9, real: the whole clip). 0 = the whole clip.
    frame_window: int | None = Field(default=None, ge=0)
    #: Recompute block activations in the backward pass (main and VACE blocks); null = the profile's (real: on).
    gradient_checkpointing: bool | None = None
    #: Keep the activations autograd saves in CPU memory (``torch.autograd.graph.save_on_cpu``) instead of on the
    #: GPU: with checkpointing only the block inputs remain, so a 24-48 GB card fits the 1.3B at 81x480x832.
    activation_offload: bool = False
    #: ``cached`` = train on the latents stage's shards; ``on_the_fly`` = encode VAE+text every step (reference).
    mode: Literal["cached", "on_the_fly"] = "cached"
    #: Fraction of "reconstruct." clips in a batch stream (0 = pairs only).
    recon_ratio: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    #: Training clips of the fit probe: the same clips and noise at σ 1, 0.9, 0.6 scored every ``fit_every``
    #: steps, and once with the backbone alone (``loss.png``'s second panel; 0 = off; cached mode only).
    fit_clips: int = Field(default=8, ge=0)
    fit_every: int = Field(default=100, ge=1)
    device: str = "auto"
    #: MLflow experiment for training runs.
    experiment: str = "pickstyle-train"
    #: Most recent checkpoints kept in ``<models>/.checkpoints/adapter`` (0 = keep all). [train helper]
    keep_checkpoints: int = 2
    #: Log the run to MLflow (off for quick experiments and most tests). [train helper]
    mlflow: bool = True


class Evaluate(Section):
    """The ``evaluate`` stage: stylize the held-out test clips with each variant and score them."""

    #: Sampling of every variant: ``sample`` with what is set here (so by default what ``pickstyle stylize`` does:
    #: the profile's ``sample_*`` steps and scales).
    sample: EvalSample = Field(default_factory=lambda: EvalSample())
    #: Variants compared (``identity`` = output equals input).
    #: ``vae`` / ``reconstruct`` check the backbone against the source (README: evaluation).
    variants: list[
        Literal["identity", "vae", "reconstruct", "base_noguide", "base", "noguide", "cfg", "cfg_joint", "cs_cfg"]
    ] = Field(
        default_factory=lambda: [
            "identity", "vae", "reconstruct", "base_noguide", "base", "noguide", "cfg", "cfg_joint", "cs_cfg"
        ]
    )  # fmt: skip
    #: Which held-out clips to score: ``test`` (the reported numbers) or ``val`` (for tuning; README: Tuning).
    split: Literal["test", "val"] = "test"
    #: At most this many test clips (0 = all).
    max_clips: int = 0
    #: Optional local CLIP model folder for a text-frame score.
    clip_model_path: str | None = None
    #: Test clips (rows) in ``eval/preview.gif``; 5 = one per built-in style (the test clips cycle through them).
    preview_clips: int = Field(default=5, ge=1)
    experiment: str = "pickstyle-eval"


class Register(Section):
    """The ``register`` stage: MLflow registry with ``@challenger`` / ``@champion`` aliases."""

    model_name: str = "pickstyle"
    #: Metric from ``eval/metrics.json`` that gates ``@champion``.
    gate_metric: str = "cs_cfg/style_psnr"
    higher_is_better: bool = True
    #: The challenger must beat the champion by at least this much...
    gate_margin: float = 0.0
    #: ...and by at least this many standard errors (over test clips) of its own gate metric, so the
    #: registry never promotes on noise.
    gate_se_multiple: float = Field(default=2.0, ge=0)
    #: MLflow experiment of the registration runs (added by the registry: each version's source run lives here).
    experiment: str = "pickstyle-register"


class Retrain(Section):
    """The ``retrain-style`` Prefect deployment."""

    #: Per-style cron schedules (UTC) of ``python -m flows.retrain serve``; the same two as ``prefect.yaml``.
    schedules: dict[str, str] = Field(default_factory=lambda: {"anime": "0 3 * * 1", "sketch": "0 3 * * 4"})


# ``register`` is also the name of ABCMeta.register on the class; instances see the field, so the warning is noise.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    """The whole of ``params.yaml``."""

    profile: str = "tiny"
    seed: int = 0
    paths: Paths = Field(default_factory=Paths)
    model: Model = Field(default_factory=Model)
    profiles: dict[str, Profile] = Field(default_factory=_default_profiles)
    pairs: Pairs = Field(default_factory=Pairs)
    clips: Clips = Field(default_factory=Clips)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    latents: Latents = Field(default_factory=Latents)
    train: Train = Field(default_factory=Train)
    sample: Sample = Field(default_factory=Sample)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    register: Register = Field(default_factory=Register)
    retrain: Retrain = Field(default_factory=Retrain)

    @model_validator(mode="after")
    def _known_profile(self) -> Params:
        if self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not one of {sorted(self.profiles)}")
        # Keys left null take the active profile's default, resolved once here so every stage reads plain values
        # (and MLflow/DVC see the value that ran, not "null").
        profile = self.profiles[self.profile]
        for (section, key), field in PROFILE_DEFAULTS.items():
            if getattr(getattr(self, section), key) is None:
                setattr(getattr(self, section), key, getattr(profile, field))
        own = self.evaluate.sample.model_dump(exclude_none=True)
        resolved = Sample.model_validate({**self.sample.model_dump(), **own})
        self.evaluate.sample = EvalSample.model_validate(resolved.model_dump())
        return self

    @property
    def active(self) -> Profile:
        """The selected profile."""
        return self.profiles[self.profile]

    @property
    def lora_rank(self) -> int:
        return self.train.lora_rank if self.train.lora_rank is not None else self.active.lora_rank

    @property
    def lora_alpha(self) -> float:
        return self.train.lora_alpha if self.train.lora_alpha is not None else self.active.lora_alpha

    def section_hash(self, *keys: str) -> str:
        """sha256 of the named top-level sections (for tags and cache keys)."""
        dump = self.model_dump(mode="json")
        payload = json.dumps({k: dump[k] for k in keys} if keys else dump, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def error_lines(err: ValidationError) -> list[str]:
    """``dotted.field: message`` per error (``unknown key`` for a typo'd key)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{loc}: {msg}")
    return lines


def _format_errors(err: ValidationError, source: str) -> str:
    return f"{source}: invalid params\n" + "\n".join(f"  {line}" for line in error_lines(err))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def parse_params(
    data: dict[str, Any] | None, source: str = "params", overrides: dict[str, Any] | None = None
) -> Params:
    """Validate a params tree; ``overrides`` maps dotted keys (``train.steps``) to values."""
    tree = dict(data or {})
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml`` (a missing file means all defaults)."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: top level must be a mapping")
    return parse_params(data, str(path), overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``-S key=value`` strings -> ``{key: YAML value}`` (``-S train.steps=50``, ``-S pairs.styles=[anime]``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"-S {item!r}: expected key=value (e.g. -S train.steps=50)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
