"""Folder importers of the ``pairs`` stage: existing (source, style image, caption) datasets as pair jobs.

Layouts (``params.pairs.source``, files found under ``params.pairs.root``):

- ``omniconsistency``: ``<root>/<style>/src/*.png``, ``<style>/tar/*.png``, ``<style>/caption/*.txt`` (by stem).
- ``pickstyle_v1``: ``<root>/unity/*.png`` sources, ``<root>/<style>/*.png`` styled (same names), and
  ``<root>/caption.json`` keyed by file name (value: a description, or ``{style: caption}``).
- ``manifest``: ``root`` is a CSV or JSONL file with ``src``, ``style`` (the style image), ``caption`` and an
  optional ``style_name``; relative paths resolve against the manifest's folder.

Each importer lists candidates; a job validates one (partner present, caption readable, both images decoded by
:func:`pickstyle.data.pairs.load_image`, sizes matched per ``on_size_mismatch``) and returns the pair or raises
the rejection that :func:`pickstyle.data.pairs.build_pairs` records. A layout that cannot be read at all raises
:class:`~pickstyle.data.pairs.PairsError`. This module imports :mod:`pickstyle.data.pairs`; ``pairs`` imports
it only inside ``build_pairs``, so there is no import cycle.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pickstyle.config import Pairs
from pickstyle.data.images import IMAGE_SUFFIXES, Reject, key_slug, load_image
from pickstyle.data.styles import STYLES, style_caption_name
from pickstyle.errors import PickstyleError


class PairsError(PickstyleError):
    """The pairs stage cannot produce any pair (bad config, unreadable layout, or every pair rejected)."""


@dataclass
class _Pair:
    """A validated pair, before encoding."""

    key: str
    style: str  # style id (``anime``, ``3d_chibi``)
    style_name: str  # as written in captions (``Anime``, ``3D Chibi``)
    caption: str
    source_id: str
    src: np.ndarray  # [h, w, 3] uint8
    style_img: np.ndarray  # [h, w, 3] uint8, same size as src
    extra: dict[str, Any] = field(default_factory=dict)


def _styled_caption(style_name: str, text: str) -> str:
    """Paper format ``"<style> style. <description>"``; a caption that already names its style is kept."""
    text = " ".join(text.split())
    if text.lower().startswith(f"{style_name.lower()} style"):
        return text
    return f"{style_name} style. {text}"


Job = Callable[[], _Pair]


def _style_display_name(folder: str) -> str:
    """Folder name -> caption name: ``3D_Chibi`` -> ``3D Chibi``, ``anime`` -> ``Anime`` (built-ins as named)."""
    if folder in STYLES:
        return style_caption_name(folder)
    name = " ".join(re.split(r"[_\-\s]+", folder.strip()))
    return name[:1].upper() + name[1:] if name.islower() else name


def _read_caption_file(path: Path, style: str) -> str:
    if not path.is_file():
        raise Reject(path, "missing caption", style=style)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise Reject(path, "caption is not UTF-8", f"invalid byte at {err.start}", style=style) from None
    except OSError as err:
        raise Reject(path, "unreadable caption", str(err), style=style) from None
    if not text.strip():
        raise Reject(path, "empty caption", style=style)
    return text


def _inline_caption(value: Any, where: str, style: str) -> str:
    """A caption given in a manifest row or ``caption.json`` entry."""
    if value is None:
        raise Reject(where, "missing caption", style=style)
    if not isinstance(value, str) or not value.strip():
        raise Reject(where, "empty caption", style=style)
    return value


def _match_sizes(
    src: np.ndarray, style_img: np.ndarray, cfg: Pairs, style_path: Path, style: str
) -> np.ndarray:
    if src.shape == style_img.shape:
        return style_img
    (h, w), (sh, sw) = src.shape[:2], style_img.shape[:2]
    if cfg.on_size_mismatch == "reject":
        raise Reject(style_path, "size mismatch", f"style {sw}x{sh} vs source {w}x{h}", style=style)
    # Pillow's Lanczos: deterministic and good both ways (down- and up-scaling).
    return np.asarray(Image.fromarray(style_img).resize((w, h), Image.Resampling.LANCZOS))


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


@dataclass
class _Candidate:
    """One imported pair before validation: where its files should be, and how to read its caption."""

    kind: str  # the importer (``pairs.source``)
    base: Path  # paths in the metadata are relative to it
    style: str  # style id, a key-safe slug of the style folder / name
    style_name: str  # as captions write it
    source_id: str
    src: Path  # may not exist: a missing partner is a rejection, not a crash
    style_path: Path
    caption: Callable[[], str]  # returns the text or raises Reject


def _load_candidate(cfg: Pairs, c: _Candidate) -> _Pair:
    """Validate one imported pair (partner, caption, both images, sizes); raises :class:`Reject`."""
    if not c.src.is_file() or not c.style_path.is_file():
        # Name the file that exists (the user looks for it) and the partner it lacks.
        present, absent, what = (
            (c.style_path, c.src, "source") if not c.src.is_file() else (c.src, c.style_path, "style")
        )
        raise Reject(present, "missing partner", f"no {what} image {_rel(absent, c.base)}", style=c.style)
    text = c.caption()
    try:
        src_rgb, style_rgb = load_image(c.src), load_image(c.style_path)
    except Reject as rej:
        rej.style = c.style
        raise
    style_hw = list(style_rgb.shape[:2])
    return _Pair(
        key=f"{c.style}_{key_slug(c.source_id)}",
        style=c.style,
        style_name=c.style_name,
        caption=_styled_caption(c.style_name, text),
        source_id=c.source_id,
        src=src_rgb,
        style_img=_match_sizes(src_rgb, style_rgb, cfg, c.style_path, c.style),
        extra={
            "source_kind": c.kind,
            "src_original_hw": list(src_rgb.shape[:2]),
            "style_original_hw": style_hw,
            "src_file": _rel(c.src, c.base),
            "style_file": _rel(c.style_path, c.base),
        },
    )


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(p.stem, p)
    return found


def _require_root(cfg: Pairs, want_dir: bool) -> Path:
    if not cfg.root:
        raise PairsError(f"pairs.root must be set for pairs.source={cfg.source}")
    root = Path(cfg.root)
    if want_dir and not root.is_dir():
        raise PairsError(f"pairs.root {root}: not a folder (pairs.source={cfg.source})")
    if not want_dir and not root.is_file():
        raise PairsError(f"pairs.root {root}: no such manifest file (pairs.source={cfg.source})")
    return root


def _omniconsistency(cfg: Pairs) -> list[_Candidate | Reject]:
    root = _require_root(cfg, want_dir=True)
    style_dirs = [d for d in sorted(root.iterdir()) if (d / "src").is_dir() or (d / "tar").is_dir()]
    if not style_dirs:
        raise PairsError(f"{root}: no <style>/src and <style>/tar folders (OmniConsistency layout)")
    found: list[_Candidate | Reject] = []
    for d in style_dirs:
        srcs, tars = _images_by_stem(d / "src"), _images_by_stem(d / "tar")
        style = key_slug(d.name).lower()
        for stem in sorted(set(srcs) | set(tars)):
            src, tar = srcs.get(stem, d / "src" / f"{stem}.png"), tars.get(stem, d / "tar" / f"{stem}.png")
            cap = functools.partial(_read_caption_file, d / "caption" / f"{stem}.txt", style)
            found.append(
                _Candidate(cfg.source, root, style, _style_display_name(d.name), stem, src, tar, cap)
            )
    return found


def _pickstyle_v1_captions(path: Path) -> dict[str, Any] | Reject:
    """``caption.json`` as a mapping, or why every caption lookup fails."""
    if not path.is_file():
        return Reject(path, "missing caption", "caption.json not found")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return Reject(path, "caption is not UTF-8", f"caption.json: invalid byte at {err.start}")
    except json.JSONDecodeError as err:
        return Reject(path, "unreadable caption", f"caption.json: invalid JSON ({err})")
    if not isinstance(data, dict):
        return Reject(path, "unreadable caption", "caption.json must map file names to captions")
    return data


def _pickstyle_v1_caption(captions: dict[str, Any] | Reject, src: Path, folder: str, style: str) -> str:
    if isinstance(captions, Reject):
        raise Reject(captions.file, captions.reason, captions.detail, style=style)
    value = next((captions[k] for k in (src.name, src.stem) if k in captions), None)
    if isinstance(value, dict):  # per-style captions: {"anime": "...", "clay": "..."}
        value = value.get(folder, value.get(style))
    return _inline_caption(value, str(src), style)


def _pickstyle_v1(cfg: Pairs) -> list[_Candidate | Reject]:
    root = _require_root(cfg, want_dir=True)
    if not (root / "unity").is_dir():
        raise PairsError(f"{root}: no unity/ folder of source images (PickStyle-Dataset v1 layout)")
    srcs = _images_by_stem(root / "unity")
    style_dirs = [
        d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "unity" and _images_by_stem(d)
    ]
    if not style_dirs:
        raise PairsError(f"{root}: no <style>/ folders of images beside unity/ (PickStyle-Dataset v1 layout)")
    captions = _pickstyle_v1_captions(root / "caption.json")
    found: list[_Candidate | Reject] = []
    for d in style_dirs:
        styled = _images_by_stem(d)
        style = key_slug(d.name).lower()
        for stem in sorted(set(srcs) | set(styled)):
            src, tar = srcs.get(stem, root / "unity" / f"{stem}.png"), styled.get(stem, d / f"{stem}.png")
            cap = functools.partial(_pickstyle_v1_caption, captions, src, d.name, style)
            found.append(
                _Candidate(cfg.source, root, style, _style_display_name(d.name), stem, src, tar, cap)
            )
    return found


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """(line number, row or why the row is unreadable) of a CSV or JSONL manifest."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PairsError(f"{path}: manifest is not UTF-8 (invalid byte at {err.start})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = sorted({"src", "style", "caption"} - set(reader.fieldnames or []))
        if missing:
            raise PairsError(
                f"{path}: manifest lacks column(s) {', '.join(missing)} (need src, style, caption)"
            )
        for row in reader:
            yield reader.line_num, row
        return
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise PairsError(f"{path}: manifest must be .csv or .jsonl")
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            row = Reject(f"{path}:{n}", "unreadable manifest row", f"invalid JSON ({err.msg})")
        if row is not None:
            yield (
                n,
                row if isinstance(row, dict | Reject) else Reject(f"{path}:{n}", "unreadable manifest row"),
            )


def _manifest(cfg: Pairs) -> list[_Candidate | Reject]:
    path = _require_root(cfg, want_dir=False)
    base = path.parent
    found: list[_Candidate | Reject] = []
    for n, row in _manifest_rows(path):
        if isinstance(row, Reject):
            found.append(row)
        elif not row.get("src") or not row.get("style"):
            found.append(Reject(f"{path}:{n}", "missing partner", "the row needs both src and style"))
        else:
            src, tar = base / str(row["src"]), base / str(row["style"])  # an absolute path stays absolute
            name = str(row.get("style_name") or "").strip() or _style_display_name(tar.parent.name)
            style = key_slug(name).lower()
            cap = functools.partial(_inline_caption, row.get("caption"), f"{path}:{n}", style)
            found.append(_Candidate(cfg.source, base, style, name, Path(str(row["src"])).stem, src, tar, cap))
    return found


def _raise(rej: Reject) -> _Pair:
    raise rej


def _import_jobs(cfg: Pairs) -> list[Job]:
    importer = {"omniconsistency": _omniconsistency, "pickstyle_v1": _pickstyle_v1, "manifest": _manifest}
    return [
        functools.partial(_raise, c) if isinstance(c, Reject) else functools.partial(_load_candidate, cfg, c)
        for c in importer[cfg.source](cfg)
    ]
