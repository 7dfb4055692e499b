"""Stage ``clips``: still pairs -> synthetic camera-motion clip pairs, plus held-out object-motion test clips.

Outputs (all WebDataset shards with ``src.mp4``, ``style.mp4`` and ``json``):

* ``<paths.data>/clips/clips-%06d.tar`` — ``clips.variants`` motion variants per pair (``kind="pair"``): the same
  trajectory (:mod:`pickstyle.data.motion`) on the source and the style image; then optional real-video
  ``"reconstruct."`` clips from ``clips.reconstruct_dir`` (``kind="reconstruct"``, target = source).
* ``<paths.data>/testclips/testclips-%06d.tar`` — procedural scenes (:mod:`pickstyle.data.scenes`: a background
  with parallax and ``clips.test_objects`` cut-out objects that translate, rotate and scale independently), with
  the exact ground-truth style clip (the built-in style applied per frame); ``kind="test"``, always lossless.
  Never used for training.
* ``<paths.data>/valclips/valclips-%06d.tar`` — ``clips.val_clips`` more scenes of the same kind from other seeds
  (other objects, paths and pans; ``kind="val"``): for choosing settings (``evaluate.split: val``) without looking
  at the test clips.
* ``<paths.data>/clips/preview.gif`` (rows of source | style) and ``manifest.json`` in every folder.

Work is cut into chunks of at most ``clips.shard_size`` clips; each chunk renders and writes its own shard
(``<prefix>-<chunk>.tar``), so ``map_fn`` can spread chunks over threads, processes or a Dask cluster (shared
filesystem) and memory stays bounded. Every random draw is seeded from ``params.seed`` and the pair key, and
x264 runs single-threaded, so the same params give the same shards on any worker count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

from pickstyle.config import Params
from pickstyle.data.clip_preview import write_preview
from pickstyle.data.clip_reader import PREFIX, TEST_PREFIX, VAL_PREFIX
from pickstyle.data.images import decode_png, key_slug
from pickstyle.data.motion import MOTIONS, check_clip_size, draw_spec, job_seed, render_pair
from pickstyle.data.scenes import _photos, draw_scene, render_scene
from pickstyle.data.shards import (
    ShardError,
    ShardProgress,
    files_fingerprint,
    iter_samples,
    list_shards,
    record_shard,
    write_shards,
)
from pickstyle.data.styles import STYLES, apply_style, style_caption_name
from pickstyle.data.video import encode_video, read_video, resize_cover_crop
from pickstyle.errors import PickstyleError
from pickstyle.files import write_json
from pickstyle.progress import progress

PAIRS_PREFIX = "pairs"
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".gif", ".mkv", ".avi", ".m4v")

MapFn = Callable[[Callable[[dict], dict], list[dict]], list[dict]]


class ClipsError(PickstyleError):
    """The clips stage cannot run (bad config, missing inputs); the message names the key or file."""


# --------------------------------------------------------------------------------------------------- helpers
def _settings(params: Params) -> dict[str, Any]:
    """The plain values a render worker needs (small, picklable, JSON-able for Prefect task inputs)."""
    c, p = params.clips, params.active
    return {
        "seed": params.seed,
        "frames": p.frames,
        "height": p.height,
        "width": p.width,
        "fps": p.fps,
        "variants": c.variants,
        "mix": dict(c.motion_mix),
        "static_prob": c.static_prob,
        "flip_prob": c.flip_prob,
        "crop_min": c.crop_min,
        "photometric": c.source_photometric,
        "lossless": c.quality == "lossless",
        "crf": c.crf,
        "chroma": c.chroma,
        "style_render": c.style_render,
        "test_objects": c.test_objects,
        "styles": list(params.pairs.styles),
        "recon_description": c.reconstruct_description,
        "recon_max_windows": c.reconstruct_max_windows,
    }


def _write_chunk(samples: list[dict[str, Any]], out_dir: str, prefix: str, index: int) -> str:
    """Write one chunk as ``<prefix>-<index>.tar`` (atomically: a temp folder, then a rename)."""
    final = Path(out_dir) / f"{prefix}-{index:06d}.tar"
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-{index:06d}.", dir=out_dir))
    try:
        (written,) = write_shards(samples, tmp, prefix, shard_size=max(1, len(samples)))
        os.replace(written, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final.name


def _clip_sample(
    key: str, src: np.ndarray, style: np.ndarray | None, meta: dict, s: dict, lossless: bool
) -> dict:
    chroma = s.get("chroma", "420")
    src_mp4 = encode_video(src, s["fps"], crf=s["crf"], lossless=lossless, chroma=chroma)
    style_mp4 = (
        src_mp4
        if style is None
        else encode_video(style, s["fps"], crf=s["crf"], lossless=lossless, chroma=chroma)
    )
    meta = {
        **meta,
        "frames": int(src.shape[0]),
        "height": int(src.shape[1]),
        "width": int(src.shape[2]),
        "fps": s["fps"],
        "codec": "libx264rgb" if lossless else "libx264",
        "lossless": lossless,
        "crf": 0 if lossless else s["crf"],
        **({} if lossless else {"chroma": chroma}),
    }
    return {
        "__key__": key,
        "src.mp4": src_mp4,
        "style.mp4": style_mp4,
        "json": json.dumps(meta, sort_keys=True),
    }


# --------------------------------------------------------------------------------------------------- pairs
def _list_pairs(pairs_dir: Path) -> list[tuple[str, str]]:
    """``(shard, key)`` of every pair, from the tar headers only; a broken shard raises naming it."""
    try:
        shards = list_shards(pairs_dir, PAIRS_PREFIX)
    except ShardError as err:
        raise ClipsError(f"{err} (the clips stage reads the pairs stage's output)") from None
    out = []
    for shard in shards:
        try:
            with tarfile.open(shard, "r") as tar:
                names = tar.getnames()
        except (OSError, tarfile.TarError) as err:
            raise ShardError(f"{shard}: not a readable tar shard ({err})") from None
        parts: dict[str, set[str]] = {}
        for name in names:
            key, _, ext = name.partition(".")
            parts.setdefault(key, set()).add(ext)
        for key, exts in parts.items():
            missing = {"src.png", "style.png", "json"} - exts
            if missing:
                raise ShardError(f"{shard}: sample {key} lacks {', '.join(sorted(missing))}")
            out.append((str(shard), key))
    return out


def _render_pairs(job: dict[str, Any]) -> dict[str, Any]:
    s = job["settings"]
    wanted: dict[str, dict[str, list[int]]] = {}
    for shard, key, variant in job["items"]:
        wanted.setdefault(shard, {}).setdefault(key, []).append(variant)
    samples, motions = [], Counter()
    for shard, keys in wanted.items():
        found = set()
        for sample in iter_samples([shard]):
            key = sample["__key__"]
            if key not in keys:
                continue
            found.add(key)
            where = f"{shard}: sample {key}"
            try:
                meta = json.loads(sample["json"])
            except (KeyError, ValueError) as err:
                raise ShardError(f"{where}: bad json ({err})") from None
            for part, field in (("src.png", "src_sha256"), ("style.png", "style_sha256")):
                want = meta.get(field)
                if want and hashlib.sha256(sample[part]).hexdigest() != want:
                    raise ShardError(f"{where}: {part} does not match its sha256 (corrupt shard)")
            src = decode_png(sample["src.png"], f"{where} src.png")
            style = decode_png(sample["style.png"], f"{where} style.png")
            if src.shape != style.shape:
                raise ShardError(f"{where}: src {src.shape} and style {style.shape} differ in size")
            style_id = meta.get("style", "")
            per_frame = (
                s["style_render"] == "per_frame"
                and meta.get("source_kind") == "builtin"
                and style_id in STYLES
            )
            for v in keys[key]:
                spec = draw_spec(
                    job_seed(s["seed"], key, v),
                    mix=s["mix"],
                    static_prob=s["static_prob"],
                    flip_prob=s["flip_prob"],
                    crop_min=s["crop_min"],
                    photometric=s["photometric"],
                )
                src_clip, style_clip = render_pair(src, style, spec, s["frames"], s["height"], s["width"])
                if per_frame:
                    # the style function at the frame's scale, frame by frame (as the test clips' ground truth)
                    style_clip = np.stack([apply_style(style_id, f) for f in src_clip])
                clip_meta = {
                    "kind": "pair",
                    "caption": meta.get("caption", ""),
                    "style": meta.get("style", ""),
                    "style_name": meta.get("style_name", meta.get("style", "")),
                    "source_id": meta.get("source_id", key),
                    "pair_key": key,
                    "variant": v,
                    "variants": s["variants"],
                    "motion": spec,
                    "style_render": "per_frame" if per_frame else "motion",
                }
                samples.append(_clip_sample(f"{key}_m{v}", src_clip, style_clip, clip_meta, s, s["lossless"]))
                motions[spec["motion"]["kind"]] += 1
        lost = set(keys) - found
        if lost:
            raise ShardError(f"{shard}: sample(s) {', '.join(sorted(lost))} listed but not readable")
    shard_name = _write_chunk(samples, job["out_dir"], job["prefix"], job["index"])
    return {"shard": shard_name, "keys": [x["__key__"] for x in samples], "motions": dict(motions)}


# --------------------------------------------------------------------------------------------------- reconstruct
def _video_fps(path: Path) -> float | None:

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return float(rate) if rate and stream.codec_context.name != "gif" else None
    except Exception:  # read_video reports unreadable files properly
        return None


def _render_reconstruct(job: dict[str, Any]) -> dict[str, Any]:
    """Windows of T frames (resampled to the profile's fps) from each real video; target = source."""
    s = job["settings"]
    T, n_windows = s["frames"], s["recon_max_windows"]
    samples = []
    for path_str in job["items"]:
        path = Path(path_str)
        fps_in = _video_fps(path)
        # decode only what the windows need (long 1080p videos would not fit in memory)
        limit = math.ceil(n_windows * T * fps_in / s["fps"]) + 1 if fps_in else None
        frames, fps_in = read_video(path, max_frames=limit)
        idx = np.floor(np.arange(0, len(frames) * s["fps"] / fps_in) * fps_in / s["fps"]).astype(int)
        idx = idx[idx < len(frames)]
        sidecar = path.with_suffix(".txt")
        description = (
            sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else s["recon_description"]
        )
        starts = list(range(0, max(1, len(idx) - T + 1), T))[:n_windows]
        for w, start in enumerate(starts):
            window = idx[start : start + T]
            # a video shorter than one clip repeats its last frame, as the reference does
            window = (
                np.concatenate([window, np.full(T - len(window), window[-1])]) if len(window) < T else window
            )
            clip = resize_cover_crop(frames[window], s["height"], s["width"])
            meta = {
                "kind": "reconstruct",
                "caption": f"reconstruct. {description}".strip(),
                "style": "reconstruct",
                "style_name": "reconstruct",
                "source_id": path.name,
                "pair_key": key_slug(path.stem),
                "variant": w,
                "motion": {
                    "kind": "real",
                    "video": path.name,
                    "start_frame": int(window[0]),
                    "fps_in": fps_in,
                },
            }
            samples.append(
                _clip_sample(f"recon_{key_slug(path.stem)}_{w:03d}", clip, None, meta, s, s["lossless"])
            )
    shard_name = _write_chunk(samples, job["out_dir"], job["prefix"], job["index"])
    return {"shard": shard_name, "keys": [x["__key__"] for x in samples], "motions": {"real": len(samples)}}


# --------------------------------------------------------------------------------------------------- test scenes
def _render_tests(job: dict[str, Any]) -> dict[str, Any]:
    """A chunk of held-out scenes: ``kind`` ``test`` (the reported numbers) or ``val`` (for tuning)."""
    s, split = job["settings"], job["kind"]
    descriptions = {pid: d for pid, d, _ in _photos()}
    samples = []
    for index in job["items"]:
        spec = draw_scene(index, s, split)
        src = render_scene(spec, s["frames"], s["height"], s["width"])
        style = np.stack([apply_style(spec["style"], f) for f in src])  # exact ground truth, frame by frame
        name = style_caption_name(spec["style"])
        meta = {
            "kind": split,
            "caption": f"{name} style. {descriptions[spec['background']]}",
            "style": spec["style"],
            "style_name": name,
            "source_id": spec["background"],
            "pair_key": f"{split}_{index:04d}",
            "variant": 0,
            "motion": spec,
        }
        # lossless: decoding gives the exact frames, so apply_style(decoded src) == decoded style
        samples.append(_clip_sample(f"{split}_{index:04d}", src, style, meta, s, lossless=True))
    shard_name = _write_chunk(samples, job["out_dir"], job["prefix"], job["index"])
    return {"shard": shard_name, "keys": [x["__key__"] for x in samples], "motions": {"scene": len(samples)}}


# --------------------------------------------------------------------------------------------------- stage
def render_chunk(job: dict[str, Any]) -> dict[str, Any]:
    """Render one chunk of clips and write it as one shard; returns ``{shard, keys, motions, kind}``.

    A top-level function of plain-dict input, so it can run in a thread, a process or on a Dask worker.
    """
    fn = {
        "pair": _render_pairs,
        "reconstruct": _render_reconstruct,
        "test": _render_tests,
        "val": _render_tests,
    }[job["kind"]]
    result = {**fn(job), "kind": job["kind"], "out_dir": job["out_dir"]}
    record_shard(job["out_dir"], result["shard"], result)  # a rerun after a kill skips this shard
    return result


def _serial_map(fn: Callable[[dict], dict], items: list[dict]) -> list[dict]:
    return [fn(item) for item in progress(items, desc="clips", unit="shard")]


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def plan_jobs(params: Params) -> list[dict[str, Any]]:
    """Every render job of the stage (pair chunks, reconstruction videos, test and val chunks), in shard order."""
    c, s = params.clips, _settings(params)
    check_clip_size(s["frames"], s["height"], s["width"])
    if c.variants < 1:
        raise ClipsError(f"clips.variants must be >= 1, got {c.variants}")
    unknown = sorted(set(c.motion_mix) - set(MOTIONS))
    if unknown:
        raise ClipsError(f"clips.motion_mix: unknown motion(s) {unknown}; known: {list(MOTIONS)}")
    if any(v < 0 for v in c.motion_mix.values()) or not 0 <= c.static_prob <= 1:
        raise ClipsError("clips.motion_mix weights must be >= 0 and clips.static_prob in [0, 1]")
    data = Path(params.paths.data)
    out_dir = str(data / PREFIX)
    items = [(shard, key, v) for shard, key in _list_pairs(data / PAIRS_PREFIX) for v in range(c.variants)]
    jobs = [
        {"kind": "pair", "items": chunk, "out_dir": out_dir, "prefix": PREFIX, "settings": s}
        for chunk in _chunks(items, c.shard_size)
    ]
    if c.reconstruct_dir:
        root = Path(c.reconstruct_dir)
        if not root.is_dir():
            raise ClipsError(f"clips.reconstruct_dir: {root} is not a folder")
        videos = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise ClipsError(f"clips.reconstruct_dir: no videos ({', '.join(VIDEO_SUFFIXES)}) in {root}")
        jobs += [
            {"kind": "reconstruct", "items": [v], "out_dir": out_dir, "prefix": PREFIX, "settings": s}
            for v in videos
        ]
    for i, job in enumerate(jobs):
        job["index"] = i
    held_out = [
        {
            "kind": kind,
            "items": chunk,
            "out_dir": str(data / prefix),
            "prefix": prefix,
            "settings": s,
            "index": i,
        }
        for kind, prefix, count in (("test", TEST_PREFIX, c.test_clips), ("val", VAL_PREFIX, c.val_clips))
        for i, chunk in enumerate(_chunks(range(count), c.shard_size))
    ]
    return jobs + held_out


def build_clips(params: Params, map_fn: MapFn | None = None) -> dict[str, Any]:
    """Build ``<paths.data>/clips`` (training clips + preview), ``<paths.data>/testclips`` and ``…/valclips``.

    Args:
        params: The run's params (reads ``seed``, ``paths.data``, the active profile, ``clips``, ``pairs.styles``).
        map_fn: ``map_fn(fn, jobs) -> results`` in job order; default a plain loop with a progress bar. The
            Prefect flow passes one that maps the jobs over a task runner (threads or Dask).

    Returns:
        The summary also written to ``clips/manifest.json``.

    Raises:
        ClipsError: Bad ``clips`` params or missing inputs. ShardError: a corrupt pairs shard (named).
        VideoError: an unreadable reconstruction video (named).
    """
    jobs = plan_jobs(params)  # validates everything before touching the outputs
    data = Path(params.paths.data)
    out_dir, test_dir, val_dir = data / PREFIX, data / TEST_PREFIX, data / VAL_PREFIX
    folders = ((out_dir, PREFIX), (test_dir, TEST_PREFIX), (val_dir, VAL_PREFIX))
    # All three folders are persist: true DVC outputs: a killed run's complete shards are kept when nothing changed.
    key = {
        "settings": _settings(params),
        "jobs": [[j["kind"], j["index"], len(j["items"])] for j in jobs],
        "pairs": files_fingerprint(list_shards(data / PAIRS_PREFIX, PAIRS_PREFIX)),
        "reconstruct": files_fingerprint(j["items"][0] for j in jobs if j["kind"] == "reconstruct"),
    }
    progress = [ShardProgress(folder, prefix, key) for folder, prefix in folders]
    done = {(str(fp.folder), shard): r for fp in progress for shard, r in fp.done().items()}
    for folder, prefix in folders:
        for stale in folder.glob(f".{prefix}-*"):  # temp files of an interrupted run
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    names = [(j["out_dir"], f"{j['prefix']}-{j['index']:06d}.tar") for j in jobs]
    todo = [j for j, name in zip(jobs, names, strict=True) if name not in done]
    fresh = iter((map_fn or _serial_map)(render_chunk, todo) if todo else [])
    results = [done[name] if name in done else next(fresh) for name in names]

    train = [r for r in results if r["kind"] in ("pair", "reconstruct")]
    tests = [r for r in results if r["kind"] == "test"]
    vals = [r for r in results if r["kind"] == "val"]
    motions: Counter[str] = Counter()
    for r in train:
        motions.update(r["motions"])
    p = params.active
    n_pairs = sum(len(r["keys"]) for r in train if r["kind"] == "pair")
    summary = {
        "pairs": n_pairs // params.clips.variants,
        "variants": params.clips.variants,
        "clips": n_pairs,
        "reconstruct_clips": sum(len(r["keys"]) for r in train if r["kind"] == "reconstruct"),
        "test_clips": sum(len(r["keys"]) for r in tests),
        "val_clips": sum(len(r["keys"]) for r in vals),
        "frames": p.frames,
        "height": p.height,
        "width": p.width,
        "fps": p.fps,
        "quality": params.clips.quality,
        "motions": dict(sorted(motions.items())),
        "shards": [r["shard"] for r in train],
        "test_shards": [r["shard"] for r in tests],
        "val_shards": [r["shard"] for r in vals],
    }
    preview = write_preview(out_dir, train, params.clips.preview_clips, p.fps)
    summary["preview"] = preview.name if preview else None
    write_json(out_dir / "manifest.json", summary)
    for split, folder in (("test", test_dir), ("val", val_dir)):
        write_json(
            folder / "manifest.json",
            {
                k: summary[k]
                for k in (f"{split}_clips", "frames", "height", "width", "fps", f"{split}_shards")
            },
        )
    for folder_progress in progress:
        folder_progress.finish()
    print(
        f"clips: {summary['clips']} pair clips ({summary['pairs']} pairs x {summary['variants']}), "
        f"{summary['reconstruct_clips']} reconstruct, {summary['test_clips']} test and {summary['val_clips']} val "
        f"clips ({p.frames}x{p.height}x{p.width} @ {p.fps} fps) -> {out_dir}, {test_dir}, {val_dir}"
    )
    return {**summary, "out_dir": str(out_dir), "test_dir": str(test_dir), "val_dir": str(val_dir)}
