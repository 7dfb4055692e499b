"""The ``pairs`` stage: built-in set, determinism, validation of every bad-input kind, importers, round trip."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pickstyle.config import parse_params
from pickstyle.data.pairs import PairsError, build_pairs, iter_pairs
from pickstyle.data.shards import ShardError, write_shards
from pickstyle.data.styles import STYLES, apply_style
from pickstyle.errors import PickstyleError

RNG = np.random.default_rng(0)


def _params(tmp_path: Path, **overrides):
    return parse_params({}, overrides={"paths.data": str(tmp_path / "data"), **overrides})


def _pairs(tmp_path: Path) -> dict[str, dict]:
    return {p["key"]: p for p in iter_pairs(tmp_path / "data" / "pairs")}


def _rejected(tmp_path: Path) -> dict[str, dict]:
    lines = (tmp_path / "data" / "pairs" / "rejected.jsonl").read_text().splitlines()
    return {Path(r["file"]).name: r for r in map(json.loads, lines)}


def _rgb(h: int = 32, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image | np.ndarray | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, bytes):
        path.write_bytes(img)
    else:
        (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path)
    return path


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("pairs-*.tar"))}


# ----------------------------------------------------------------------------------------------- built-in


def test_builtin_default_set(tmp_path: Path):
    """The embedded default: 5 styles x 48 pairs at 128 px, captions in the paper's format."""
    summary = build_pairs(_params(tmp_path))
    default_styles = ["anime", "sketch", "sepia", "pixel", "watercolor"]
    assert summary["styles"] == {s: 48 for s in default_styles}
    assert summary["total"] == 240 and summary["rejected"] == 0 and summary["source"] == "builtin"
    manifest = json.loads((tmp_path / "data" / "pairs" / "manifest.json").read_text())
    assert manifest["styles"] == summary["styles"] and manifest["shards"] == sorted(manifest["shards"])
    assert (tmp_path / "data" / "pairs" / "rejected.jsonl").read_text() == ""
    pairs = list(iter_pairs(tmp_path / "data" / "pairs"))
    assert len(pairs) == 240 and len({p["key"] for p in pairs}) == 240
    assert len({p["meta"]["source_id"] for p in pairs}) >= 4
    for p in pairs[::7]:
        meta = p["meta"]
        assert "." not in p["key"] and p["key"].startswith(meta["style"] + "_" + meta["source_id"])
        assert p["src"].shape == p["style"].shape == (128, 128, 3)
        assert re.fullmatch(r"[A-Z][a-z ]+ style\. [A-Z].+\.", meta["caption"]), meta["caption"]
        assert meta["caption"].startswith(f"{meta['style_name']} style. ")


def test_builtin_style_is_exact_function_of_source(tmp_path: Path):
    build_pairs(
        _params(tmp_path, **{"pairs.styles": ["anime", "sketch"], "pairs.per_style": 3, "pairs.size": 32})
    )
    pairs = _pairs(tmp_path)
    assert len(pairs) == 6
    for p in pairs.values():
        assert np.array_equal(p["style"], apply_style(p["meta"]["style"], p["src"]))
        assert p["meta"]["augment"]["crop_xyxy"] and isinstance(p["meta"]["augment"]["hflip"], bool)
    # Random crops: the pairs of one style are different images.
    srcs = [p["src"] for k, p in sorted(pairs.items()) if k.startswith("anime")]
    assert not np.array_equal(srcs[0], srcs[1])


def test_same_params_give_byte_identical_shards(tmp_path: Path):
    over = {"pairs.per_style": 4, "pairs.size": 48, "pairs.shard_size": 7}
    build_pairs(_params(tmp_path / "a", **over))
    build_pairs(_params(tmp_path / "b", **over))
    a, b = _shard_hashes(tmp_path / "a/data/pairs"), _shard_hashes(tmp_path / "b/data/pairs")
    assert len(a) == 3 and a == b  # 20 pairs / 7 per shard
    build_pairs(_params(tmp_path / "c", seed=1, **over))
    assert _shard_hashes(tmp_path / "c/data/pairs") != a


def test_stale_shards_removed_and_unknown_style(tmp_path: Path):
    out = tmp_path / "data" / "pairs"
    _save(out / "pairs-000042.tar", b"stale")
    build_pairs(_params(tmp_path, **{"pairs.styles": ["sepia"], "pairs.per_style": 2, "pairs.size": 24}))
    assert [p.name for p in out.glob("pairs-*.tar")] == ["pairs-000000.tar"]
    with pytest.raises(PairsError, match=r"unknown style\(s\) oil; known styles: anime"):
        build_pairs(_params(tmp_path, **{"pairs.styles": ["oil"]}))
    assert (out / "pairs-000000.tar").exists(), "a config error must not delete the previous output"


def test_iter_pairs_errors(tmp_path: Path):
    with pytest.raises(ShardError, match="no pairs-"):
        list(iter_pairs(tmp_path))
    _save(tmp_path / "pairs-000000.tar", b"not a tar")
    with pytest.raises(ShardError, match="pairs-000000.tar"):
        list(iter_pairs(tmp_path))
    # A sample whose image bytes do not match the sha256 in its metadata.
    meta = {"style": "x", "caption": "c", "src_sha256": "0" * 64}
    png = _png_bytes(_rgb())
    write_shards(
        [{"__key__": "k", "src.png": png, "style.png": png, "json": json.dumps(meta)}], tmp_path, "pairs"
    )
    with pytest.raises(ShardError, match="sample k: src.png does not match its sha256"):
        list(iter_pairs(tmp_path))


# ----------------------------------------------------------------------------------------------- validation


def _omni(root: Path, style: str, stem: str, src=None, tar=None, caption: str | bytes | None = None) -> None:
    if src is not None:
        _save(root / style / "src" / f"{stem}.png", src)
    if tar is not None:
        _save(root / style / "tar" / f"{stem}.png", tar)
    if caption is not None:
        cap = root / style / "caption" / f"{stem}.txt"
        cap.parent.mkdir(parents=True, exist_ok=True)
        cap.write_bytes(caption if isinstance(caption, bytes) else caption.encode())


def test_every_bad_input_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "omni"
    good = _rgb()
    _omni(root, "anime", "good", good, _rgb(), "a cat on a sofa")
    _omni(root, "anime", "truncated", _png_bytes(_rgb(64, 64))[:900], _rgb(), "cut")
    _omni(root, "anime", "junk", _rgb(), b"this is not an image", "junk")
    _omni(root, "anime", "lonely", _rgb(), None, "no partner")
    _omni(root, "anime", "nocap", _rgb(), _rgb())
    _omni(root, "anime", "emptycap", _rgb(), _rgb(), "  \n ")
    _omni(root, "anime", "latin1", _rgb(), _rgb(), "caf\xe9 au lait".encode("latin-1"))
    _omni(root, "anime", "tiny", _rgb(8, 8), _rgb(8, 8), "too small")
    # Conversions to 8-bit RGB.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[:16, :, 3] = 200, 255  # top half opaque red-ish, bottom half transparent
    _omni(root, "anime", "rgba", Image.fromarray(rgba, "RGBA"), _rgb(), "alpha")
    grey = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    _omni(root, "anime", "grey", Image.fromarray(grey), _rgb(), "grey")
    palette = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    _omni(root, "anime", "palette", palette, _rgb(), "palette")
    deep = np.full((32, 32), 257 * 100, np.uint16)
    deep[0, 0] = 65535
    _omni(root, "anime", "deep", Image.fromarray(deep), _rgb(), "16-bit")
    _omni(root, "anime", "bigstyle", _rgb(32, 40), _rgb(64, 80), "size mismatch")

    summary = build_pairs(_params(tmp_path, **{"pairs.source": "omniconsistency", "pairs.root": str(root)}))
    printed = capsys.readouterr().out
    assert (
        "pairs: 6 pairs (anime 6)" in printed
        and "7 rejected (1 caption is not UTF-8, 1 empty caption" in printed
    )
    rejected = _rejected(tmp_path)
    assert {name: r["reason"].split(":")[0] for name, r in rejected.items()} == {
        "truncated.png": "unreadable or truncated image",
        "junk.png": "not an image",
        "lonely.png": "missing partner",
        "nocap.txt": "missing caption",
        "emptycap.txt": "empty caption",
        "latin1.txt": "caption is not UTF-8",
        "tiny.png": "image too small",
    }
    assert all(r["style"] == "anime" for r in rejected.values())
    assert summary["rejected"] == 7 and summary["rejected_reasons"]["missing partner"] == 1
    pairs = _pairs(tmp_path)
    assert sorted(pairs) == sorted(
        f"anime_{s}" for s in ("good", "rgba", "grey", "palette", "deep", "bigstyle")
    )
    assert np.array_equal(pairs["anime_good"]["src"], good)
    assert pairs["anime_good"]["meta"]["caption"] == "Anime style. a cat on a sofa"
    src = pairs["anime_rgba"]["src"]
    assert (src[:16] == [200, 0, 0]).all() and (src[16:] == 255).all(), "alpha must composite on white"
    assert np.array_equal(pairs["anime_grey"]["src"], np.repeat(grey[..., None], 3, axis=2))
    assert np.array_equal(pairs["anime_palette"]["src"], np.asarray(palette.convert("RGB")))
    deep8 = pairs["anime_deep"]["src"]
    assert deep8[0, 0].tolist() == [255, 255, 255] and (deep8[1:, 1:] == 100).all()
    big = pairs["anime_bigstyle"]
    assert big["style"].shape == big["src"].shape == (32, 40, 3)
    assert big["meta"]["style_original_hw"] == [64, 80] and big["meta"]["src_original_hw"] == [32, 40]


def test_size_mismatch_reject_and_all_invalid(tmp_path: Path):
    root = tmp_path / "omni"
    _omni(root, "clay", "a", _rgb(32, 32), _rgb(48, 48), "mismatch")
    _omni(root, "clay", "b", _rgb(), None, "lonely")
    params = _params(tmp_path, **{"pairs.source": "omniconsistency", "pairs.root": str(root)})
    assert build_pairs(params)["total"] == 1  # resized by default
    params.pairs.on_size_mismatch = "reject"
    with pytest.raises(
        PairsError, match=r"no valid pair .* 2 rejected \(1 missing partner, 1 size mismatch\)"
    ) as err:
        build_pairs(params)
    assert isinstance(err.value, PickstyleError)
    assert "rejected.jsonl" in str(err.value)
    assert _rejected(tmp_path)["a.png"]["reason"] == "size mismatch: style 48x48 vs source 32x32"
    assert (
        not list((tmp_path / "data" / "pairs").glob("pairs-*.tar"))
        and not (tmp_path / "data/pairs/manifest.json").exists()
    )


# ----------------------------------------------------------------------------------------------- importers


def test_omniconsistency_layout(tmp_path: Path):
    root = tmp_path / "OmniConsistency"
    for style in ("3D_Chibi", "LEGO"):
        for stem in ("001", "002.v2", "002_v2"):
            _omni(root, style, stem, _rgb(), _rgb(), f"a toy robot number {stem}")
    _omni(root, "LEGO", "003", _rgb(), _rgb(), "LEGO style, a brick house")
    summary = build_pairs(_params(tmp_path, **{"pairs.source": "omniconsistency", "pairs.root": str(root)}))
    assert summary["styles"] == {"3d_chibi": 3, "lego": 4} and summary["rejected"] == 0
    pairs = _pairs(tmp_path)
    # Dots in file names never reach a key; names that slug alike still get unique keys.
    assert {"3d_chibi_002_v2", "3d_chibi_002_v2_2"} <= set(pairs)
    meta = pairs["3d_chibi_001"]["meta"]
    assert meta["caption"] == "3D Chibi style. a toy robot number 001"
    assert meta["source_kind"] == "omniconsistency" and meta["src_file"] == "3D_Chibi/src/001.png"
    assert pairs["lego_003"]["meta"]["caption"] == "LEGO style, a brick house", (
        "a caption naming its style is kept"
    )


def test_pickstyle_v1_layout(tmp_path: Path):
    root = tmp_path / "pickstyle"
    for stem in ("f0", "f1"):
        _save(root / "unity" / f"{stem}.png", _rgb())
        _save(root / "anime" / f"{stem}.png", _rgb())
    _save(root / "clay" / "f0.png", _rgb())  # clay/f1.png is missing
    captions = {"f0.png": "a girl walking in a park", "f1.png": {"anime": "Anime style. a boy with a kite"}}
    (root / "caption.json").write_text(json.dumps(captions))
    summary = build_pairs(_params(tmp_path, **{"pairs.source": "pickstyle_v1", "pairs.root": str(root)}))
    assert summary["styles"] == {"anime": 2, "clay": 1}
    assert summary["rejected"] == 1 and summary["rejected_reasons"] == {"missing partner": 1}
    pairs = _pairs(tmp_path)
    assert pairs["anime_f0"]["meta"]["caption"] == "Anime style. a girl walking in a park"
    assert pairs["clay_f0"]["meta"]["caption"] == "Clay style. a girl walking in a park"
    assert pairs["anime_f1"]["meta"]["caption"] == "Anime style. a boy with a kite"
    assert np.array_equal(pairs["clay_f0"]["src"], np.asarray(Image.open(root / "unity" / "f0.png")))


def _manifest_rows(tmp_path: Path) -> list[dict]:
    imgs = tmp_path / "imgs"
    _save(imgs / "src" / "a.png", _rgb())
    _save(imgs / "pop" / "a.png", _rgb())
    _save(imgs / "src" / "b.jpg", _rgb())
    _save(imgs / "ink" / "b.png", _rgb())
    return [
        {"src": "imgs/src/a.png", "style": "imgs/pop/a.png", "caption": "a red car", "style_name": "Pop Art"},
        {"src": "imgs/src/b.jpg", "style": str(imgs / "ink" / "b.png"), "caption": "a dog"},
        {"src": "imgs/src/missing.png", "style": "imgs/pop/a.png", "caption": "gone"},
        {"src": "imgs/src/a.png", "style": "imgs/pop/a.png", "caption": ""},
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_layout(tmp_path: Path, fmt: str):
    rows = _manifest_rows(tmp_path)
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        lines = ["src,style,caption,style_name"] + [
            f"{r['src']},{r['style']},{r['caption']},{r.get('style_name', '')}" for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    summary = build_pairs(_params(tmp_path, **{"pairs.source": "manifest", "pairs.root": str(path)}))
    assert summary["styles"] == {"pop_art": 1, "ink": 1}
    want = {"missing partner": 1, "empty caption": 1} | (
        {"unreadable manifest row": 1} if fmt == "jsonl" else {}
    )
    assert summary["rejected_reasons"] == want
    pairs = _pairs(tmp_path)
    assert pairs["pop_art_a"]["meta"]["caption"] == "Pop Art style. a red car"
    assert pairs["ink_b"]["meta"]["caption"] == "Ink style. a dog"  # style_name from the style image's folder
    assert pairs["ink_b"]["meta"]["src_file"] == "imgs/src/b.jpg"


def test_config_and_layout_errors(tmp_path: Path):
    with pytest.raises(PairsError, match="pairs.root must be set"):
        build_pairs(_params(tmp_path, **{"pairs.source": "omniconsistency"}))
    with pytest.raises(PairsError, match="not a folder"):
        build_pairs(
            _params(tmp_path, **{"pairs.source": "pickstyle_v1", "pairs.root": str(tmp_path / "nope")})
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsError, match="no unity/ folder"):
        build_pairs(
            _params(tmp_path, **{"pairs.source": "pickstyle_v1", "pairs.root": str(tmp_path / "empty")})
        )
    with pytest.raises(PairsError, match="OmniConsistency layout"):
        build_pairs(
            _params(tmp_path, **{"pairs.source": "omniconsistency", "pairs.root": str(tmp_path / "empty")})
        )
    bad = tmp_path / "m.csv"
    bad.write_text("src,caption\na.png,x\n")
    with pytest.raises(PairsError, match=r"lacks column\(s\) style"):
        build_pairs(_params(tmp_path, **{"pairs.source": "manifest", "pairs.root": str(bad)}))
    bad.write_bytes(b"src,style,caption\na.png,b.png,caf\xe9\n")
    with pytest.raises(PairsError, match="manifest is not UTF-8"):
        build_pairs(_params(tmp_path, **{"pairs.source": "manifest", "pairs.root": str(bad)}))


def test_builtin_styles_cover_registry():
    assert set(parse_params({}).pairs.styles) <= set(STYLES)
