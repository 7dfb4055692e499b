"""The clips stage: shard round trip, replay, determinism, test clips, reconstruction, errors."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pickstyle.config import Params, parse_params
from pickstyle.data.clip_reader import iter_clips
from pickstyle.data.clips import ClipsError, build_clips
from pickstyle.data.images import encode_png
from pickstyle.data.motion import render_pair
from pickstyle.data.shards import ShardError, write_shards
from pickstyle.data.styles import apply_style
from pickstyle.data.video import encode_video

TINY = {
    "backbone": "tiny",
    "frames": 5,
    "height": 32,
    "width": 48,
    "fps": 8,
    "lora_rank": 4,
    "lora_alpha": 4.0,
}


def pair_images(i: int, h: int = 40, w: int = 56) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w]
    src = np.stack([(x * 5 + 40 * i) % 256, (y * 6) % 256, ((x // 6 + y // 6) % 2) * 200 + i], -1).astype(
        np.uint8
    )
    return src, apply_style("sepia", src)


def make_pairs(data: Path, n: int = 3, shard_size: int = 2) -> list[Path]:
    """Tiny ``pairs`` shards in the pairs stage's format (src.png, style.png, json)."""
    samples = []
    for i in range(n):
        src, style = pair_images(i)
        meta = {
            "style": "sepia",
            "style_name": "Sepia",
            "caption": f"Sepia style. Test image {i}.",
            "source_id": f"img{i}",
        }
        samples.append(
            {
                "__key__": f"sepia_img{i}",
                "src.png": encode_png(src),
                "style.png": encode_png(style),
                "json": json.dumps(meta),
            }
        )
    return write_shards(samples, data / "pairs", "pairs", shard_size)


def make_params(data: Path, **clips) -> Params:
    cfg = {
        "test_clips": 2,
        "val_clips": 1,
        "test_objects": 2,
        "preview_clips": 2,
        "shard_size": 4,
        "variants": 1,
    }
    cfg.update(clips)
    return parse_params(
        {
            "profiles": {"tiny": TINY},
            "paths": {"data": str(data)},
            "clips": cfg,
            "pairs": {"styles": ["sepia", "pixel"]},
        }
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = tmp_path_factory.mktemp("built") / "data"
    make_pairs(data)
    params = make_params(
        data, variants=2, quality="lossless", motion_mix={"zoom_in": 1, "rotate": 1, "tilt": 1, "handheld": 1}
    )
    return params, build_clips(params)


def test_shard_round_trip_and_metadata(built):
    params, summary = built
    data = Path(params.paths.data)
    assert summary["pairs"] == 3 and summary["clips"] == 6 and summary["test_clips"] == 2
    assert summary["shards"] == ["clips-000000.tar", "clips-000001.tar"]  # 6 clips, 4 per shard
    assert sum(summary["motions"].values()) == 6
    clips = list(iter_clips(data / "clips"))
    assert [c["key"] for c in clips] == [f"sepia_img{i}_m{v}" for i in range(3) for v in range(2)]
    for c in clips:
        assert c["src"].shape == c["style"].shape == (5, 32, 48, 3) and c["src"].dtype == np.uint8
        m = c["meta"]
        assert m["kind"] == "pair" and m["caption"].startswith("Sepia style.") and m["style"] == "sepia"
        assert (m["frames"], m["height"], m["width"], m["fps"]) == (5, 32, 48, 8)
        assert m["pair_key"] == c["key"].rsplit("_m", 1)[0] and m["motion"]["motion"]["kind"] in MOTIONS_USED
    assert clips[0]["meta"]["motion"] != clips[1]["meta"]["motion"]  # K variants differ
    manifest = json.loads((data / "clips" / "manifest.json").read_text())
    assert manifest["clips"] == 6
    gif = Image.open(data / "clips" / "preview.gif")
    assert gif.n_frames == 5 and gif.size[0] >= 2 * 48


MOTIONS_USED = {"static", "zoom_in", "rotate", "tilt", "handheld"}


def test_clip_replays_from_its_stored_spec(built):
    params, _ = built
    for c in iter_clips(Path(params.paths.data) / "clips"):
        i = int(c["meta"]["pair_key"][-1])
        src, style = render_pair(*pair_images(i), c["meta"]["motion"], 5, 32, 48)
        np.testing.assert_array_equal(c["src"], src)  # lossless: the decoded clip is the rendered one
        np.testing.assert_array_equal(c["style"], style)


def test_builtin_pairs_styled_per_frame_or_under_the_motion(tmp_path):
    """``per_frame``: a built-in pair's styled clip is its style applied to each rendered source frame (the test
    clips' ground truth); ``motion``, and any pair not made by a built-in style, renders the style image."""
    data = tmp_path / "data"
    make_pairs(data)
    shard = next((data / "pairs").glob("*.tar"))
    samples = []
    for i in range(2):  # the same images, marked as the pairs stage marks its built-in pairs
        src, style = pair_images(i)
        meta = {
            "style": "sepia",
            "caption": "Sepia style. x.",
            "source_id": f"b{i}",
            "source_kind": "builtin",
        }
        samples.append(
            {
                "__key__": f"sepia_b{i}",
                "src.png": encode_png(src),
                "style.png": encode_png(style),
                "json": json.dumps(meta),
            }
        )
    write_shards(samples, tmp_path / "extra", "pairs", 2)[0].rename(shard.with_name("pairs-000099.tar"))
    for render in ("per_frame", "motion"):
        params = make_params(data, quality="lossless", style_render=render, motion_mix={"zoom_in": 1})
        build_clips(params)
        clips = {c["key"]: c for c in iter_clips(data / "clips")}
        for key, c in clips.items():
            builtin = key.startswith("sepia_b")
            i = int(c["meta"]["pair_key"][-1])
            src, style = render_pair(*pair_images(i), c["meta"]["motion"], 5, 32, 48)
            np.testing.assert_array_equal(c["src"], src)
            if render == "per_frame" and builtin:
                assert c["meta"]["style_render"] == "per_frame"
                np.testing.assert_array_equal(c["style"], np.stack([apply_style("sepia", f) for f in src]))
                assert not np.array_equal(c["style"], style)  # the frame's own vignette, not the image's
            else:
                assert c["meta"]["style_render"] == "motion"
                np.testing.assert_array_equal(c["style"], style)
        for folder in ("clips", "testclips", "valclips"):
            shutil.rmtree(data / folder)


def test_test_clips_have_object_motion_and_exact_ground_truth(built):
    params, _ = built
    clips = list(iter_clips(Path(params.paths.data) / "testclips", "testclips"))
    assert [c["meta"]["style"] for c in clips] == ["sepia", "pixel"]
    for c in clips:
        m = c["meta"]
        assert m["kind"] == "test" and len(m["motion"]["objects"]) == 2
        assert not np.array_equal(c["src"][0], c["src"][-1])
        truth = np.stack([apply_style(m["style"], f) for f in c["src"]])
        np.testing.assert_array_equal(c["style"], truth)


def test_val_clips_are_other_scenes_and_leave_the_test_clips_as_they_were(built, tmp_path):
    params, summary = built
    data = Path(params.paths.data)
    assert summary["val_clips"] == 1 and summary["val_shards"] == ["valclips-000000.tar"]
    (val,) = list(iter_clips(data / "valclips", "valclips"))
    tests = list(iter_clips(data / "testclips", "testclips"))
    assert val["key"] == "val_0000" and val["meta"]["kind"] == "val"
    np.testing.assert_array_equal(
        val["style"], np.stack([apply_style(val["meta"]["style"], f) for f in val["src"]])
    )
    # scene 0 of each split: same style (they cycle alike), other seed and background
    assert val["meta"]["style"] == tests[0]["meta"]["style"]
    assert val["meta"]["motion"]["background"] != tests[0]["meta"]["motion"]["background"]
    assert val["meta"]["motion"]["objects"] != tests[0]["meta"]["motion"]["objects"]
    # rendering val clips changes no test clip: the same test shard without them
    other = tmp_path / "data"
    make_pairs(other)
    no_val = make_params(
        other,
        val_clips=0,
        variants=2,
        quality="lossless",
        motion_mix={"zoom_in": 1, "rotate": 1, "tilt": 1, "handheld": 1},
    )
    assert build_clips(no_val)["val_clips"] == 0
    assert json.loads((other / "valclips" / "manifest.json").read_text())["val_shards"] == []
    for name in ("testclips/testclips-000000.tar", "clips/clips-000000.tar"):
        assert (other / name).read_bytes() == (data / name).read_bytes(), name


def test_same_params_give_byte_identical_shards_on_any_worker_count(tmp_path):
    def run(name: str, map_fn=None) -> dict[str, bytes]:
        data = tmp_path / name
        make_pairs(data)
        build_clips(make_params(data, motion_mix={"dolly": 1, "slide_left": 1}), map_fn=map_fn)
        return {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.glob("*clips/*"))}

    def threads(fn, jobs):
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(fn, jobs))

    a, b = run("a"), run("b", map_fn=threads)
    assert sorted(a) == sorted(b) and len(a) == 7  # clips, testclips, valclips shards, preview, 3 manifests
    assert a == b


def test_corrupt_pairs_shard_is_named(tmp_path):
    data = tmp_path / "data"
    shards = make_pairs(data)
    shards[1].write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(ShardError, match="pairs-000001.tar"):
        build_clips(make_params(data))


def test_broken_image_in_pairs_shard_is_named(tmp_path):
    data = tmp_path / "data"
    meta = json.dumps({"style": "sepia", "caption": "Sepia style. x", "source_id": "x"})
    write_shards(
        [{"__key__": "bad", "src.png": b"\x89PNG broken", "style.png": b"nope", "json": meta}],
        data / "pairs",
        "pairs",
    )
    with pytest.raises(ShardError, match=r"pairs-000000.tar: sample bad"):
        build_clips(make_params(data))


def test_missing_pairs_and_bad_params_fail_clearly(tmp_path):
    with pytest.raises(ClipsError, match="pairs"):
        build_clips(make_params(tmp_path / "nothing"))
    data = tmp_path / "data"
    make_pairs(data)
    with pytest.raises(ClipsError, match="clips.motion_mix"):
        build_clips(make_params(data, motion_mix={"spin": 1.0}))
    with pytest.raises(ClipsError, match="clips.reconstruct_dir"):
        build_clips(make_params(data, reconstruct_dir=str(tmp_path / "no_videos")))


def test_reconstruct_clips_from_real_videos(tmp_path):
    data = tmp_path / "data"
    make_pairs(data, n=1)
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.stack([np.roll(pair_images(0)[0], 3 * t, axis=1) for t in range(24)])
    (videos / "walk.mp4").write_bytes(encode_video(frames, 16, lossless=True))  # 16 fps -> 8 fps: every 2nd
    (videos / "walk.txt").write_text("a pattern sliding sideways\n")
    images = [Image.fromarray(f) for f in frames[:3]]
    images[0].save(videos / "short.gif", save_all=True, append_images=images[1:], duration=125, loop=0)
    params = make_params(data, reconstruct_dir=str(videos), reconstruct_max_windows=2, test_clips=0)
    summary = build_clips(params)
    assert summary["reconstruct_clips"] == 3  # walk: 12 frames at 8 fps -> 2 windows; short: 1 padded window
    recon = [c for c in iter_clips(data / "clips") if c["meta"]["kind"] == "reconstruct"]
    assert [c["key"] for c in recon] == ["recon_short_000", "recon_walk_000", "recon_walk_001"]
    for c in recon:
        np.testing.assert_array_equal(c["src"], c["style"])  # target = source
        assert c["src"].shape == (5, 32, 48, 3)
    assert recon[0]["meta"]["caption"] == "reconstruct. a real video clip"
    assert recon[1]["meta"]["caption"] == "reconstruct. a pattern sliding sideways"
    assert recon[2]["meta"]["motion"]["start_frame"] == 10  # second window: output frames 5.. = source 10..
    assert summary["test_clips"] == 0


def test_a_killed_run_keeps_its_complete_shards(tmp_path):
    data = tmp_path / "data"
    make_pairs(data, n=6)
    params = make_params(data, shard_size=2, motion_mix={"slide_left": 1})
    build_clips(params)
    want = {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.glob("*clips/*"))}

    class Killed(Exception):
        pass

    def dies_after_two(fn, jobs):  # renders two chunks, then the process "dies"
        for job in jobs[:2]:
            fn(job)
        raise Killed

    for folder in ("clips", "testclips", "valclips"):
        shutil.rmtree(data / folder)
    with pytest.raises(Killed):
        build_clips(params, map_fn=dies_after_two)
    assert not (data / "clips" / "manifest.json").exists()

    rendered = []

    def counting(fn, jobs):
        rendered.extend(j["index"] for j in jobs)
        return [fn(j) for j in jobs]

    build_clips(params, map_fn=counting)
    assert rendered == [2, 0, 0]  # the third pair chunk, the test and the val chunk; chunks 0 and 1 were kept
    got = {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.glob("*clips/*"))}
    assert got == want and not (data / "clips" / ".partial").exists()

    rendered.clear()  # other settings: everything is rendered again
    build_clips(make_params(data, shard_size=2, motion_mix={"zoom_in": 1}), map_fn=counting)
    assert len(rendered) == 5  # 3 pair chunks, 1 test, 1 val
