"""Stage ``latents``: encode every training clip once (VAE + text), so training runs the transformer only.

Per clip, with the backbone's own pipeline code (:func:`encode_clip`: the tensors equal what sampling feeds the
transformer), the cache stores only the information (docs/method.md §2; ``latents.safetensors`` + the clip's ``json``):

- ``target`` ``[16, f, h, w]``: the style clip's VAE latent, normalised ``(z - mean) / std`` with the VAE's
  ``latents_mean``/``latents_std``;
- ``source`` ``[16, f, h, w]``: the normalised source latent: the reactive half of the VACE context;
- ``prompt_embeds`` ``[n, text_dim]``: ``encode_prompt(caption)`` at its true length ``n`` (Wan pads the rest with
  zeros; :func:`decode_latents` pads back to the stored ``prompt_length``);

in the transformer's dtype (bf16 on GPU). The 96-channel context ``[VAE(0), VAE(source), mask]`` is rebuilt when
batching: VAE(0) (inactive half) and the 64-channel mask (ones) are the same for every clip, stored once per
folder in ``context.safetensors``. At 81x480x832 this is 8.6 MB per clip instead of 46 MB
(:func:`cache_bytes_per_clip`).

``f = (T - 1) / t + 1``, ``h = H / s``, ``w = W / s`` for the VAE's temporal/spatial factors t, s. Shards:
``<data>/latents/latents-%06d.tar``; the folder is a ``persist: true`` DVC output and a killed run keeps its
complete shards (:class:`pickstyle.data.shards.ShardProgress`).
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
from safetensors.torch import load, load_file, save, save_file
from tqdm.auto import tqdm

from pickstyle.config import WAN_NEGATIVE_PROMPT, Params
from pickstyle.data.clip_reader import iter_clips
from pickstyle.data.shards import ShardProgress, ShardSink, files_fingerprint, iter_samples, list_shards
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path, resolve_device, write_json
from pickstyle.model import latent_space
from pickstyle.model.components import (
    backbone_fingerprint,
    backbone_path,
    ensure_backbone,
    load_pipeline,
    prompt_length,
)

PREFIX = "latents"
TENSOR_EXT = "latents.safetensors"
#: Tensors stored per latents sample.
KEYS = ("target", "source", "prompt_embeds")
#: Per folder: the context's constant parts (``inactive`` = normalised VAE(0), ``mask``), one copy.
CONTEXT_FILE = "context.safetensors"


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
        # The pipeline would silently rescale or zero-pad the context (docs/method.md §3): refuse instead.
        raise LatentsError(f"clip is {h}x{w} but {height}x{width} was requested")
    base = vae_scale * patch
    if height % base or width % base:
        raise LatentsError(f"height and width must be multiples of {base}, got {height}x{width}")
    if (t - 1) % 4:
        raise LatentsError(f"clip has {t} frames; the VAE needs 4n+1")


@torch.no_grad()
def encode_clip(
    pipe: Any,
    src_frames: np.ndarray,
    style_frames: np.ndarray,
    caption: str,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Encode one (source, style, caption) clip exactly as the sampling pipeline would.

    Args:
        pipe: A ``WanVACEPipeline`` (or subclass) from :func:`pickstyle.model.components.load_pipeline`, with or
            without its transformer (only its config's ``patch_size`` and its dtype are read).
        src_frames: Source clip, uint8 ``[T, H, W, 3]``, T = 4n+1.
        style_frames: Style clip of the same shape (the target).
        caption: Prompt, e.g. ``"anime style. a wolf in the snow"``.
        height: Expected frame height (default: the frames'); must equal it.
        width: Expected frame width (default: the frames').
        device: Where to encode (default: the pipeline's execution device).

    Returns:
        ``target`` [16, f, h, w] fp32, ``context`` [96, f, h, w] and ``prompt_embeds`` [L, D] in the
        transformer's dtype, ``source`` [16, f, h, w] fp32; all on ``device``.
    """

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
    both = latent_space.encode(pipe.vae, torch.cat([video, style]))  # [2, z, f, h, w] fp32
    reactive, target = both[:1], both[1:]
    inactive = latent_space.zeros_latent(pipe.vae, tuple(video.shape), device)  # [1, z, f, h, w] fp32
    vae_dtype = pipe.vae.dtype
    masks = pipe.prepare_masks(mask, refs, None)  # [1, 64, f, h, w]
    # [1, 96, f, h, w]; the latents pass through the VAE's dtype first, as the pipeline's context does
    context = latent_space.vace_context(inactive.to(vae_dtype), reactive.to(vae_dtype), masks)
    context = context.to(transformer_dtype)
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


def lean(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`encode_clip`'s tensors -> (what a sample stores, the context's constant parts).

    The prompt keeps its true length: the trailing all-zero rows are Wan's padding (restored by
    :func:`decode_latents`, so dropping them loses nothing even if a real row were zero).
    """
    prompt = tensors["prompt_embeds"]
    nonzero = prompt.abs().sum(dim=-1).nonzero()
    n = int(nonzero[-1]) + 1 if len(nonzero) else 0
    dtype = tensors["context"].dtype
    z = tensors["source"].shape[0]
    stored = {
        "target": tensors["target"].to(dtype),
        "source": tensors["context"][z : 2 * z],  # the reactive half, exactly as the context holds it
        "prompt_embeds": prompt[:n],
    }
    constants = {"inactive": tensors["context"][:z], "mask": tensors["context"][2 * z :]}
    return stored, constants


@torch.no_grad()
def null_prompt(pipe: Any, device: str | torch.device) -> torch.Tensor:
    """The sampler's default null text (Wan's negative prompt) encoded as training prompts are ``[L, D]``:
    what a caption becomes under ``train.caption_dropout``."""
    embeds, _ = pipe.encode_prompt(
        prompt=WAN_NEGATIVE_PROMPT,
        do_classifier_free_guidance=False,
        max_sequence_length=prompt_length(pipe),
        device=torch.device(device),
    )
    return embeds[0].to(pipe.transformer.dtype)


def build_context(source: torch.Tensor, constants: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 96-channel VACE context ``[VAE(0), source, mask]`` of one clip (``source`` ``[16, f, h, w]``)."""
    return latent_space.vace_context(constants["inactive"], source, constants["mask"])


def cache_bytes_per_clip(
    frames: int,
    height: int,
    width: int,
    *,
    z: int = 16,
    spatial: int = 8,
    temporal: int = 4,
    text_dim: int = 4096,
    prompt_tokens: int = 512,
    stored_tokens: int = 64,
    bytes_per: int = 2,
    lean_cache: bool = True,
) -> int:
    """Bytes of one cached clip (Wan2.1 geometry by default): the lean layout, or the old full one (fp32 target
    and source, the 96-channel context, the prompt padded to 512 tokens)."""
    f, h, w = (frames - 1) // temporal + 1, height // spatial, width // spatial
    latent = z * f * h * w
    if lean_cache:
        return 2 * latent * bytes_per + stored_tokens * text_dim * bytes_per
    return 2 * latent * 4 + 6 * latent * bytes_per + prompt_tokens * text_dim * bytes_per


def to_sample(
    key: str, encoded: dict[str, torch.Tensor], meta: dict[str, Any], prompt_tokens: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One :func:`encode_clip` result -> (the shard sample, the folder's context constants)."""
    tensors, constants = lean(encoded)
    meta = {
        **meta,
        "latents": {
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
            "prompt_length": prompt_tokens,
        },
    }
    sample = {
        "__key__": key,
        TENSOR_EXT: encode_sample(tensors),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False),
    }
    return sample, constants


def save_constants(folder: str | Path, constants: dict[str, torch.Tensor]) -> None:
    """Write ``context.safetensors`` (atomically) into a latents folder."""

    with atomic_path(Path(folder) / CONTEXT_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in constants.items()}, str(tmp))
    _CONSTANTS.pop(str(Path(folder) / CONTEXT_FILE), None)


def encode_sample(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors -> ``latents.safetensors`` bytes (contiguous CPU copies)."""

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


_CONSTANTS: dict[str, dict[str, torch.Tensor]] = {}


def context_constants(folder: str | Path) -> dict[str, torch.Tensor]:
    """``inactive`` and ``mask`` of a latents folder (read once per process)."""

    path = Path(folder) / CONTEXT_FILE
    if str(path) not in _CONSTANTS:
        if not path.is_file():
            raise LatentsError(f"{path}: missing (rerun the latents stage: `dvc repro latents`)")
        _CONSTANTS[str(path)] = load_file(str(path))
    return _CONSTANTS[str(path)]


def decode_latents(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A raw latents sample (bytes per extension, as :func:`pickstyle.data.shards.iter_samples` yields it) ->
    ``target``, ``source``, ``context`` (rebuilt) and ``prompt_embeds`` (padded back to its stored length)."""

    where = f"sample {raw.get('__key__')!r} of {raw.get('__url__')}"
    data = raw.get(TENSOR_EXT)
    if data is None:
        raise LatentsError(f"{where} has no {TENSOR_EXT}")
    tensors = load(bytes(data))
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise LatentsError(f"{where} lacks tensors {missing}")
    try:
        meta = json.loads(raw["json"])
        length = int(meta["latents"]["prompt_length"])
    except (KeyError, TypeError, ValueError) as err:
        raise LatentsError(f"{where}: its json has no latents.prompt_length ({err})") from None
    prompt = tensors["prompt_embeds"]
    if prompt.shape[0] < length:
        prompt = torch.cat([prompt, prompt.new_zeros(length - prompt.shape[0], prompt.shape[1])])
    folder = Path(str(raw.get("__url__", "."))).parent
    return {
        "target": tensors["target"],
        "source": tensors["source"],
        "context": build_context(tensors["source"], context_constants(folder)),
        "prompt_embeds": prompt,
    }


def iter_latents(folder: str | Path, prefix: str = PREFIX) -> Iterator[dict[str, Any]]:
    """Yield every latents sample of ``folder``: ``key``, ``meta`` (the json) and the tensors of :data:`KEYS`."""
    for raw in iter_samples(list_shards(folder, prefix)):
        meta = json.loads(raw["json"]) if "json" in raw else {}
        yield {"key": raw["__key__"], "meta": meta, **decode_latents(raw)}


def build_latents(params: Params) -> dict[str, Any]:
    """Encode every clip of ``<data>/clips`` once into ``<data>/latents/latents-%06d.tar``.

    A killed run keeps its complete shards: the rerun (same clips, backbone and settings) encodes only the rest.

    Returns:
        A summary (clips, shards, shapes, bytes per clip, device, seconds, clips_per_s); ``summary.json`` holds it
        without the timings.
    """

    clips_dir = Path(params.paths.data) / "clips"
    out_dir = Path(params.paths.data) / "latents"
    clip_shards = list_shards(clips_dir, "clips")  # a clear error before loading the backbone
    device = resolve_device(params.latents.device)
    backbone = ensure_backbone(params)
    size = params.latents.shard_size
    key = {
        "clips": files_fingerprint(clip_shards),
        "backbone": backbone_fingerprint(backbone_path(params)),
        "dtype": params.model.dtype,
        "device": device,
        "shard_size": size,
    }
    progress = ShardProgress(out_dir, PREFIX, key)
    done = progress.done()
    kept = len(done)
    if sorted(done) != [f"{PREFIX}-{i:06d}.tar" for i in range(kept)]:  # only a prefix of shards can be kept
        progress.reset()
        kept = 0
    if kept == 0:
        (out_dir / CONTEXT_FILE).unlink(missing_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)  # present = the folder is complete
    # VAE and text encoder only: the transformer (28 GB of bf16 weights on 14B) is never read here.
    pipe = load_pipeline(backbone, device=device, dtype=params.model.dtype, transformer=False)
    start = time.perf_counter()
    count, shapes, nbytes = kept * size, {}, 0
    pairs: set[str] = set()
    variants = 1
    if kept:  # the pairs of the kept shards
        for raw in iter_samples(list_shards(out_dir, PREFIX)[:kept]):
            meta = json.loads(raw["json"])
            if meta.get("kind") == "pair":
                pairs.add(meta.get("pair_key", raw["__key__"]))
                variants = max(variants, int(meta.get("variants") or 1))
    with ShardSink(out_dir, PREFIX, size, start=kept) as sink:
        for clip in tqdm(
            iter_clips(clips_dir, skip=kept * size), desc="latents", unit="clip", initial=kept * size
        ):
            if clip["meta"].get("kind") == "pair":
                pairs.add(clip["meta"].get("pair_key", clip["key"]))
                variants = max(variants, int(clip["meta"].get("variants") or 1))
            encoded = encode_clip(pipe, clip["src"], clip["style"], clip["meta"]["caption"], device=device)
            sample, constants = to_sample(clip["key"], encoded, clip["meta"], prompt_length(pipe))
            shapes = {k: list(v.shape) for k, v in encoded.items()}
            nbytes = len(sample[TENSOR_EXT])
            if not (out_dir / CONTEXT_FILE).is_file():
                save_constants(out_dir, {**constants, "null_prompt": null_prompt(pipe, device)})
            sink.write(sample)
            count += 1
            if sink.count % size == 0:  # the shard just flushed is complete
                progress.record(sink.paths[-1], {"clips": size})
    if count == 0:
        raise LatentsError(f"{clips_dir}: the clip shards hold no clips")
    seconds = time.perf_counter() - start
    summary = {
        "clips": count,
        "shards": kept + len(sink.paths),
        "shapes": shapes,
        "bytes_per_clip": nbytes,
        "pairs": len(pairs),
        "variants": variants,
        "device": device,
        "backbone": str(backbone),
    }
    # Timings stay out of the stage's output: same clips -> byte-identical folder (and DVC hash).
    write_json(out_dir / "summary.json", summary)
    progress.finish()
    return {
        **summary,
        "resumed_shards": kept,
        "seconds": round(seconds, 3),
        "clips_per_s": round((count - kept * size) / seconds, 3) if seconds else None,
    }
