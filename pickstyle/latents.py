"""Stage ``latents``: encode every training clip once (VAE + text), so training runs the transformer only.

Per clip, with the backbone's own pipeline code (so the tensors equal what sampling feeds the transformer):

- ``target``  ``[16, f, h, w]``: the style clip's VAE latent, normalised ``(z - mean) / std`` with the VAE's
  ``latents_mean``/``latents_std`` (fp32: the loss is computed on it);
- ``context`` ``[96, f, h, w]``: the source clip's VACE context with mask = ones, i.e. VAE(0) (inactive),
  VAE(video) (reactive) and the 64-channel mask, from ``preprocess_conditions``/``prepare_video_latents``/
  ``prepare_masks`` (in the transformer's dtype, as the pipeline casts it);
- ``source``  ``[16, f, h, w]``: the normalised source latent (the reactive half of the context; fp32);
- ``prompt_embeds`` ``[L, text_dim]``: ``encode_prompt(caption)`` padded to :func:`prompt_length` tokens.

with ``f = (T - 1) / 4 + 1``, ``h = H / 8``, ``w = W / 8``. Stored as ``latents.safetensors`` + ``json`` (the
clip's metadata) in ``<data>/latents/latents-%06d.tar``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from pickstyle.config import Params
from pickstyle.data.shards import ShardSink, iter_samples, list_shards
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_dir, resolve_device, write_json

PREFIX = "latents"
TENSOR_EXT = "latents.safetensors"
#: Tensors of every latents sample.
KEYS = ("target", "context", "source", "prompt_embeds")


class LatentsError(PickstyleError):
    """A clip cannot be encoded (bad geometry) or a latents shard is malformed."""


def _pil_frames(frames: np.ndarray, name: str) -> list[PIL.Image.Image]:
    """uint8 ``[T, H, W, 3]`` -> PIL frames, the form the pipeline's video processor reads as [0, 255]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise LatentsError(f"{name} frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return [PIL.Image.fromarray(f) for f in frames]


def _check_geometry(
    src: np.ndarray, style: np.ndarray, height: int, width: int, vae_scale: int, patch: int
) -> None:
    t, h, w = src.shape[:3]
    if style.shape != src.shape:
        raise LatentsError(f"source {src.shape} and style {style.shape} clips differ in shape")
    if (h, w) != (height, width):
        # The pipeline would silently rescale or zero-pad the context (DESIGN §3): refuse instead.
        raise LatentsError(f"clip is {h}x{w} but {height}x{width} was requested")
    base = vae_scale * patch
    if height % base or width % base:
        raise LatentsError(f"height and width must be multiples of {base}, got {height}x{width}")
    if (t - 1) % 4:
        raise LatentsError(f"clip has {t} frames; the VAE needs 4n+1")


def _normalised_latents(pipe: Any, videos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """VAE mode of ``videos`` [b, 3, T, H, W], normalised with the VAE's latents mean/std (fp32) as the pipeline."""
    from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents

    z_dim = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean, device=device, dtype=torch.float32).view(
        1, z_dim, 1, 1, 1
    )
    std = torch.tensor(pipe.vae.config.latents_std, device=device, dtype=torch.float32).view(
        1, z_dim, 1, 1, 1
    )
    z = retrieve_latents(pipe.vae.encode(videos.to(pipe.vae.dtype)), None, sample_mode="argmax")
    return (z.float() - mean) * (1.0 / std)


def _zeros_latent(pipe: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Normalised VAE(zeros) of a video ``shape``: the context's inactive half, the same for every clip."""
    cache = pipe.__dict__.setdefault("_pickstyle_zeros_latent", {})
    key = (shape, str(device), str(pipe.vae.dtype))
    if key not in cache:
        cache[key] = _normalised_latents(pipe, torch.zeros(shape, device=device), device)
    return cache[key]


@torch.no_grad()
def encode_clip(
    pipe: Any,
    src_frames: np.ndarray,
    style_frames: np.ndarray,
    caption: str,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device | None = None,
    *,
    params: Params | None = None,
) -> dict[str, torch.Tensor]:
    """Encode one (source, style, caption) clip exactly as the sampling pipeline would.

    Args:
        pipe: A ``WanVACEPipeline`` (or subclass) from :func:`pickstyle.model.components.load_pipeline`.
        src_frames: Source clip, uint8 ``[T, H, W, 3]``, T = 4n+1.
        style_frames: Style clip of the same shape (the target).
        caption: Prompt, e.g. ``"anime style. a wolf in the snow"``.
        height: Expected frame height (default: the frames'); must equal it.
        width: Expected frame width (default: the frames').
        device: Where to encode (default: the pipeline's execution device).
        params: Unused; accepted so the training loop can pass its params (geometry comes from the frames).

    Returns:
        ``target`` [16, f, h, w] fp32, ``context`` [96, f, h, w] and ``prompt_embeds`` [L, D] in the
        transformer's dtype, ``source`` [16, f, h, w] fp32; all on ``device``.
    """
    from pickstyle.model.components import prompt_length

    del params
    src_frames, style_frames = np.asarray(src_frames), np.asarray(style_frames)
    height = int(src_frames.shape[1]) if height is None else height
    width = int(src_frames.shape[2]) if width is None else width
    patch = pipe.transformer.config.patch_size[1]
    _check_geometry(src_frames, style_frames, height, width, pipe.vae_scale_factor_spatial, patch)
    device = torch.device(device) if device is not None else pipe._execution_device
    num_frames = int(src_frames.shape[0])
    transformer_dtype = pipe.transformer.dtype

    # Same preprocessing and normalisation as the parent pipeline's ``prepare_video_latents`` with mask = ones
    # (-> "reactive" = VAE(video), "inactive" = VAE(zeros)), done in fewer VAE calls: the source and the style clip
    # go through the encoder as one batch of 2, and VAE(zeros) is computed once per clip shape and reused.
    video, mask, refs = pipe.preprocess_conditions(
        _pil_frames(src_frames, "source"), None, None, 1, height, width, num_frames, torch.float32, device
    )
    style, _, _ = pipe.preprocess_conditions(
        _pil_frames(style_frames, "style"), None, None, 1, height, width, num_frames, torch.float32, device
    )
    both = _normalised_latents(pipe, torch.cat([video, style]), device)  # [2, 16, f, h, w] fp32
    reactive, target = both[:1], both[1:]
    inactive = _zeros_latent(pipe, tuple(video.shape), device)  # [1, 16, f, h, w] fp32
    vae_dtype = pipe.vae.dtype
    video_latents = torch.cat([inactive.to(vae_dtype), reactive.to(vae_dtype)], dim=1)  # [1, 32, f, h, w]
    masks = pipe.prepare_masks(mask, refs, None)  # [1, 64, f, h, w]
    context = torch.cat([video_latents, masks], dim=1).to(transformer_dtype)  # [1, 96, f, h, w]
    source = reactive.to(vae_dtype).float()  # the reactive half, as stored in the context

    prompt_embeds, _ = pipe.encode_prompt(
        prompt=caption,
        do_classifier_free_guidance=False,
        max_sequence_length=prompt_length(pipe),
        device=device,
    )
    return {
        "target": target[0],
        "context": context[0],
        "source": source[0],
        "prompt_embeds": prompt_embeds[0].to(transformer_dtype),
    }


def encode_sample(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors -> ``latents.safetensors`` bytes (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def decode_latents(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A raw latents sample (bytes per extension, as :func:`pickstyle.data.shards.iter_samples` yields it) ->
    its tensors ``target``, ``context``, ``source``, ``prompt_embeds``."""
    from safetensors.torch import load

    data = raw.get(TENSOR_EXT)
    if data is None:
        raise LatentsError(f"sample {raw.get('__key__')!r} of {raw.get('__url__')} has no {TENSOR_EXT}")
    tensors = load(bytes(data))
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise LatentsError(f"sample {raw.get('__key__')!r} of {raw.get('__url__')} lacks tensors {missing}")
    return tensors


def iter_latents(folder: str | Path, prefix: str = PREFIX) -> Iterator[dict[str, Any]]:
    """Yield every latents sample of ``folder``: ``key``, ``meta`` (the json) and the tensors of :data:`KEYS`."""
    for raw in iter_samples(list_shards(folder, prefix)):
        meta = json.loads(raw["json"]) if "json" in raw else {}
        yield {"key": raw["__key__"], "meta": meta, **decode_latents(raw)}


def build_latents(params: Params) -> dict[str, Any]:
    """Encode every clip of ``<data>/clips`` once into ``<data>/latents/latents-%06d.tar``.

    The folder is replaced as a whole when all clips are encoded (a crash keeps the previous latents).

    Returns:
        A summary (clips, shards, shapes, device, seconds, clips_per_s); ``summary.json`` holds it without the
        timings.
    """
    from tqdm.auto import tqdm

    from pickstyle.data.clips import iter_clips
    from pickstyle.model.components import ensure_backbone, load_pipeline, prompt_length

    clips_dir = Path(params.paths.data) / "clips"
    out_dir = Path(params.paths.data) / "latents"
    list_shards(
        clips_dir, "clips"
    )  # a clear error before loading the backbone when the clips stage never ran
    device = resolve_device(params.latents.device)
    backbone = ensure_backbone(params)
    pipe = load_pipeline(backbone, device=device, dtype=params.model.dtype)
    start = time.perf_counter()
    count, shapes = 0, {}
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        with ShardSink(tmp, PREFIX, params.latents.shard_size) as sink:
            for clip in tqdm(iter_clips(clips_dir), desc="latents", unit="clip"):
                meta = dict(clip["meta"])
                tensors = encode_clip(pipe, clip["src"], clip["style"], meta["caption"], device=device)
                shapes = {k: list(v.shape) for k, v in tensors.items()}
                meta["latents"] = {
                    "shapes": shapes,
                    "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
                    "prompt_length": prompt_length(pipe),
                }
                sink.write(
                    {
                        "__key__": clip["key"],
                        TENSOR_EXT: encode_sample(tensors),
                        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False),
                    }
                )
                count += 1
        if count == 0:
            raise LatentsError(f"{clips_dir}: the clip shards hold no clips")
        seconds = time.perf_counter() - start
        summary = {
            "clips": count,
            "shards": len(sink.paths),
            "shapes": shapes,
            "device": device,
            "backbone": str(backbone),
        }
        # Timings stay out of the stage's output: same clips -> byte-identical folder (and DVC hash).
        write_json(tmp / "summary.json", summary)
    return {
        **summary,
        "seconds": round(seconds, 3),
        "clips_per_s": round(count / seconds, 3) if seconds else None,
    }
