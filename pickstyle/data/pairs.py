"""Stage ``pairs``: (source image, style image, caption) pairs, validated and written as WebDataset shards.

Sources (``params.pairs.source``):

- ``builtin`` (the embedded default): real photos shipped inside scikit-image's data folder, each with a
  hand-written description, x the procedural styles of :mod:`pickstyle.data.styles`. Every pair is a seeded
  random crop/scale/flip of a photo (one albumentations draw) and the style applied to that crop, so the
  style image is an exact function of the source.
- ``omniconsistency``, ``pickstyle_v1``, ``manifest``: existing datasets read by the folder importers of
  :mod:`pickstyle.data.importers` (layouts documented there; imported lazily by :func:`build_pairs`).

Every image is fully decoded and converted to 8-bit RGB (alpha composited on white, grey/palette/16-bit
converted). A bad pair (unreadable or truncated image, missing partner, missing/empty/non-UTF-8 caption, size
mismatch under ``on_size_mismatch: reject``) is skipped and listed in ``rejected.jsonl``; the stage fails only
when no valid pair remains. Output: ``<paths.data>/pairs/pairs-%06d.tar`` (``src.png``, ``style.png``, ``json``)
plus ``manifest.json``; PNGs are encoded with fixed settings, so the same params give byte-identical shards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np

from pickstyle.config import Params
from pickstyle.data.images import MIN_SIDE, Reject, decode_png, encode_png, load_builtin_photos
from pickstyle.data.importers import Job, PairsError, _import_jobs, _Pair, _styled_caption
from pickstyle.data.shards import ShardError, ShardSink, iter_samples, list_shards, remove_shards
from pickstyle.data.styles import STYLES, apply_style, style_caption_name
from pickstyle.files import atomic_path, write_json
from pickstyle.progress import progress

PREFIX = "pairs"


# ----------------------------------------------------------------------------------------------- built-in


def _sample_seed(seed: int, style: str, index: int) -> int:
    """Independent seed per (params seed, style, index): one pair never depends on how many others exist."""
    return int(np.random.SeedSequence([seed, zlib.crc32(style.encode()), index]).generate_state(1)[0])


def _builtin_jobs(params: Params) -> tuple[list[Job], list[dict[str, Any]]]:
    cfg = params.pairs
    unknown = [s for s in cfg.styles if s not in STYLES]
    if unknown:
        raise PairsError(
            f"pairs.styles: unknown style(s) {', '.join(unknown)}; known styles: {', '.join(sorted(STYLES))}"
        )
    if cfg.size < MIN_SIDE:
        raise PairsError(f"pairs.size must be >= {MIN_SIDE}, got {cfg.size}")
    photos, failed = load_builtin_photos()
    if not photos:
        raise PairsError("no built-in photo could be loaded from scikit-image's data folder")
    # Random crop (25-100 % of the area, 3:4..4:3), scaled to size x size, mirrored half the time.
    # INTER_AREA: the crops are downscaled several times and linear interpolation would alias.
    augment = A.Compose(
        [
            A.RandomResizedCrop(
                size=(cfg.size, cfg.size),
                scale=(0.25, 1.0),
                ratio=(0.75, 4 / 3),
                interpolation=cv2.INTER_AREA,
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
        ],
        save_applied_params=True,
        seed=params.seed,
    )

    def make(style: str, index: int) -> _Pair:
        photo, img = photos[index % len(photos)]
        seed = _sample_seed(params.seed, style, index)
        augment.set_random_seed(seed)
        out = augment(image=img)
        applied = dict(out["applied_transforms"])
        src = np.ascontiguousarray(out["image"])
        name = style_caption_name(style)
        return _Pair(
            key=f"{style}_{photo.id}_{index:04d}",
            style=style,
            style_name=name,
            caption=_styled_caption(name, photo.description),
            source_id=photo.id,
            src=src,
            style_img=apply_style(style, src),
            extra={
                "source_kind": "builtin",
                "src_original_hw": list(src.shape[:2]),
                "style_original_hw": list(src.shape[:2]),
                "augment": {
                    "photo_hw": list(img.shape[:2]),
                    "crop_xyxy": [int(v) for v in applied["RandomResizedCrop"]["crop_coords"]],
                    "hflip": "HorizontalFlip" in applied,
                    "seed": seed,
                },
            },
        )

    jobs = [functools.partial(make, style, i) for style in cfg.styles for i in range(cfg.per_style)]
    return jobs, failed


# ----------------------------------------------------------------------------------------------- stage


def _sample(pair: _Pair) -> dict[str, Any]:
    src_png, style_png = encode_png(pair.src), encode_png(pair.style_img)
    meta = {
        "style": pair.style,
        "style_name": pair.style_name,
        "caption": pair.caption,
        "source_id": pair.source_id,
        "hw": list(pair.src.shape[:2]),
        "src_sha256": hashlib.sha256(src_png).hexdigest(),
        "style_sha256": hashlib.sha256(style_png).hexdigest(),
        **pair.extra,
    }
    return {
        "__key__": pair.key,
        "src.png": src_png,
        "style.png": style_png,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False),
    }


def build_pairs(params: Params) -> dict[str, Any]:
    """Build ``<paths.data>/pairs``: validated pairs as shards, ``rejected.jsonl`` and ``manifest.json``.

    Args:
        params: The run's params (reads ``seed``, ``paths.data`` and ``pairs``).

    Returns:
        The summary also written to ``manifest.json`` (counts per style, total, rejected, source, shards),
        plus ``out_dir``.

    Raises:
        PairsError: The config or folder layout is unusable, or no valid pair remains.
    """
    cfg = params.pairs
    out_dir = Path(params.paths.data) / PREFIX
    failed: list[dict[str, Any]] = []
    # Check the config and list the work before touching the output, so a typo keeps the old shards.
    if cfg.source == "builtin":
        jobs, failed = _builtin_jobs(params)
    else:
        jobs = _import_jobs(cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_shards(out_dir, PREFIX)
    for stale in [out_dir / "manifest.json", *out_dir.glob(f".{PREFIX}-*.tmp")]:
        stale.unlink(missing_ok=True)

    rejected = list(failed)
    counts: Counter[str] = Counter()
    names: dict[str, str] = {}
    keys: set[str] = set()
    with ShardSink(out_dir, PREFIX, cfg.shard_size) as sink:
        for job in progress(jobs, desc="pairs", unit="pair"):
            try:
                pair = job()
            except Reject as rej:
                rejected.append(rej.record())
                continue
            # Keys must be unique ("a.b.png" and "a_b.png" slug alike): number the later ones.
            key, n = pair.key, 1
            while key in keys:
                n += 1
                key = f"{pair.key}_{n}"
            keys.add(key)
            pair.key = key
            sink.write(_sample(pair))
            counts[pair.style] += 1
            names[pair.style] = pair.style_name

    with atomic_path(out_dir / "rejected.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejected))
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    if not counts:
        raise PairsError(
            f"no valid pair from pairs.source={cfg.source}"
            + (f" (root {cfg.root})" if cfg.root else "")
            + f": {len(rejected)} rejected ({why or 'nothing found'}); see {out_dir / 'rejected.jsonl'}"
        )

    manifest = {
        "source": cfg.source,
        "root": cfg.root,
        "seed": params.seed,
        "total": sum(counts.values()),
        "styles": dict(sorted(counts.items())),
        "style_names": dict(sorted(names.items())),
        "rejected": len(rejected),
        "rejected_reasons": dict(sorted(reasons.items())),
        "shards": [p.name for p in sink.paths],
    }
    write_json(out_dir / "manifest.json", manifest)
    per_style = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
    print(f"pairs: {manifest['total']} pairs ({per_style}) in {len(sink.paths)} shard(s) -> {out_dir}")
    if rejected:
        print(f"pairs: {len(rejected)} rejected ({why}); see {out_dir / 'rejected.jsonl'}")
    return {**manifest, "out_dir": str(out_dir)}


def iter_pairs(pairs_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the pairs of ``pairs_dir`` in shard order.

    Yields:
        ``{"key": str, "src": uint8 [h, w, 3], "style": uint8 [h, w, 3], "meta": dict}`` (``meta`` = the json part).

    Raises:
        ShardError: No shards, an unreadable shard, a sample missing a part, or an image whose sha256 differs
            from its metadata.
    """
    for sample in iter_samples(list_shards(pairs_dir, PREFIX)):
        key, url = sample["__key__"], sample.get("__url__", str(pairs_dir))
        missing = [p for p in ("src.png", "style.png", "json") if p not in sample]
        if missing:
            raise ShardError(f"{url}: sample {key} lacks {', '.join(missing)}")
        meta = json.loads(sample["json"])
        for part, field_name in (("src.png", "src_sha256"), ("style.png", "style_sha256")):
            want = meta.get(field_name)
            if want and hashlib.sha256(sample[part]).hexdigest() != want:
                raise ShardError(f"{url}: sample {key}: {part} does not match its sha256 (corrupt shard)")
        yield {
            "key": key,
            "src": decode_png(
                sample["src.png"], f"{sample.get('__url__')}: sample {sample['__key__']} src.png"
            ),
            "style": decode_png(
                sample["style.png"], f"{sample.get('__url__')}: sample {sample['__key__']} style.png"
            ),
            "meta": meta,
        }
