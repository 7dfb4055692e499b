"""The ``latents`` stage: shapes, the context's structure, and a shard round trip equal to direct encoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from pickstyle.config import TinyBackbone, parse_params
from pickstyle.data.shards import iter_samples, list_shards, write_shards
from pickstyle.data.video import encode_video
from pickstyle.latents import (
    LatentsError,
    build_latents,
    cache_bytes_per_clip,
    decode_latents,
    encode_clip,
    iter_latents,
)
from pickstyle.model import latent_space
from pickstyle.model.components import load_pipeline, tiny_latent_geometry

T, H, W = 9, 64, 96


def _clip(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random source clip and an inverted "style" version of it, uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 4, 6, 3)).astype(np.float32)
    frames = np.repeat(np.repeat(base, H // 4, axis=1), W // 6, axis=2)
    frames = np.concatenate([np.roll(frames, 2 * t, axis=2) for t in range(T)]).astype(np.uint8)
    return frames, 255 - frames


def _write_clips(folder: Path, n: int = 3) -> None:
    samples = []
    for i in range(n):
        src, style = _clip(i)
        meta = {
            "caption": f"sepia style. scene {i}",
            "frames": T,
            "height": H,
            "width": W,
            "fps": 8,
            "kind": "pair",
        }
        samples.append(
            {
                "__key__": f"clip{i:04d}",
                "src.mp4": encode_video(src, 8, crf=0),
                "style.mp4": encode_video(style, 8, crf=0),
                "json": json.dumps(meta),
            }
        )
    write_shards(samples, folder, "clips", shard_size=2)


def test_encode_clip_shapes_and_context(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    src, style = _clip(0)
    out = encode_clip(pipe, src, style, "sepia style. a scene")
    c, f, h, w = tiny_latent_geometry(TinyBackbone(), T, H, W)
    z = TinyBackbone().vae_z_dim
    assert out["target"].shape == (z, f, h, w)
    assert out["source"].shape == (z, f, h, w)
    assert out["context"].shape == (c, f, h, w)
    assert out["prompt_embeds"].shape == (32, 32)  # [max_text_tokens, text_dim]
    assert torch.equal(out["context"][z : 2 * z], out["source"])  # reactive = normalised VAE(video)
    assert torch.all(out["context"][2 * z :] == 1)  # mask = ones
    assert not torch.allclose(out["target"], out["source"])  # style differs from source
    # the inactive half is VAE(zeros): independent of the video
    other = encode_clip(pipe, *_clip(1), "sepia style. a scene")
    assert torch.equal(other["context"][:z], out["context"][:z])
    assert torch.equal(other["prompt_embeds"], out["prompt_embeds"])
    anime, _ = pipe.encode_prompt(
        "anime style. a scene", do_classifier_free_guidance=False, max_sequence_length=32
    )
    assert not torch.equal(anime[0], out["prompt_embeds"])


def test_encode_clip_matches_the_pipelines_own_context(tiny_backbone: Path) -> None:
    """The batched/cached encoding equals WanVACEPipeline.prepare_video_latents + prepare_masks."""
    from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents

    pipe = load_pipeline(tiny_backbone)
    # diffusers' stock pipeline encodes clip-wise; the frame-wise path: tests/model/test_latent_space.py
    latent_space.set_framewise(pipe.vae, False)
    src, style = _clip(2)
    out = encode_clip(pipe, src, style, "sepia style. a scene")
    frames = [Image.fromarray(f) for f in src]
    video, mask, refs = pipe.preprocess_conditions(frames, None, None, 1, H, W, T, torch.float32, "cpu")
    with torch.no_grad():
        ref = torch.cat(
            [
                pipe.prepare_video_latents(video, mask, refs, None, "cpu"),
                pipe.prepare_masks(mask, refs, None),
            ],
            1,
        )
        style_video, _, _ = pipe.preprocess_conditions(
            [Image.fromarray(f) for f in style], None, None, 1, H, W, T, torch.float32, "cpu"
        )
        z = retrieve_latents(pipe.vae.encode(style_video), None, sample_mode="argmax")
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(out["context"], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["target"], ((z - mean) / std)[0], atol=1e-4, rtol=1e-4)


def test_encode_clip_rejects_bad_geometry(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    src, style = _clip(0)
    with pytest.raises(LatentsError, match="requested"):
        encode_clip(pipe, src, style, "x", height=32, width=32)
    with pytest.raises(LatentsError, match="4n\\+1"):
        encode_clip(pipe, src[:8], style[:8], "x")
    with pytest.raises(LatentsError, match="differ"):
        encode_clip(pipe, src, style[:5], "x")


def _no_transformer(*args, **kwargs):
    raise AssertionError("the latents stage instantiated the transformer")


def test_build_latents_round_trip(tiny_backbone: Path, tmp_path: Path, monkeypatch) -> None:
    from diffusers import WanVACETransformer3DModel

    from pickstyle.data.clip_reader import iter_clips

    data = tmp_path / "data"
    _write_clips(data / "clips", n=3)
    # models = the fixture's folder: ensure_backbone finds its marker and reuses it
    params = parse_params(
        {"paths": {"data": str(data), "models": str(tiny_backbone.parent)}, "latents": {"shard_size": 2}}
    )
    # the stage reads VAE and text encoder only: building or loading a transformer fails the test
    monkeypatch.setattr(WanVACETransformer3DModel, "from_pretrained", _no_transformer)
    monkeypatch.setattr(WanVACETransformer3DModel, "__init__", _no_transformer)
    summary = build_latents(params)
    monkeypatch.undo()
    assert summary["clips"] == 3 and summary["shards"] == 2 and summary["backbone"] == str(tiny_backbone)
    assert summary["shapes"]["context"] == list(tiny_latent_geometry(TinyBackbone(), 9, 64, 96))
    assert not (data / "latents" / ".partial").exists()  # no bookkeeping left in a finished folder

    stored = list(iter_latents(data / "latents"))
    assert [s["key"] for s in stored] == ["clip0000", "clip0001", "clip0002"]
    assert stored[1]["meta"]["caption"] == "sepia style. scene 1" and stored[1]["meta"]["kind"] == "pair"

    # the stored tensors equal a direct encoding of the decoded clips with the whole pipeline (what on-the-fly
    # training computes)
    pipe = load_pipeline(Path(summary["backbone"]))
    for clip, s in zip(iter_clips(data / "clips"), stored, strict=True):
        direct = encode_clip(pipe, clip["src"], clip["style"], clip["meta"]["caption"])
        for k, v in direct.items():
            assert torch.equal(s[k], v), k

    # lean: a stored sample holds target, source and the prompt at its true length only
    raw = next(iter(iter_samples(list_shards(data / "latents", "latents"))))
    tensors = load(bytes(raw["latents.safetensors"]))
    assert set(tensors) == {"target", "source", "prompt_embeds"}
    assert 0 < tensors["prompt_embeds"].shape[0] < 32

    with pytest.raises(LatentsError, match="latents.safetensors"):
        decode_latents({"__key__": "x", "json": b"{}"})


def test_cache_is_over_three_times_leaner_at_wan_geometry() -> None:
    before = cache_bytes_per_clip(81, 480, 832, lean_cache=False)
    after = cache_bytes_per_clip(81, 480, 832)
    print(f"latent cache per 81x480x832 clip: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    assert 45e6 < before < 47e6 and before / after > 3


class _Killed(Exception):
    pass


def test_build_latents_keeps_complete_shards_of_a_killed_run(
    tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickstyle.latents as lat

    data = tmp_path / "data"
    _write_clips(data / "clips", n=3)
    params = parse_params(
        {"paths": {"data": str(data), "models": str(tiny_backbone.parent)}, "latents": {"shard_size": 1}}
    )
    build_latents(params)
    want = {p.name: p.read_bytes() for p in (data / "latents").iterdir()}

    calls, real = [], lat.encode_clip

    def dies_at_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed  # stands for kill -9: the third shard is never written
        return real(*args, **kw)

    shutil.rmtree(data / "latents")
    monkeypatch.setattr(lat, "encode_clip", dies_at_the_third)
    with pytest.raises(_Killed):
        build_latents(params)
    assert not (data / "latents" / "summary.json").exists()  # an incomplete folder says so
    calls.clear()
    summary = build_latents(params)
    assert summary["resumed_shards"] == 2 and len(calls) == 1  # only the third clip is encoded again
    assert {p.name: p.read_bytes() for p in (data / "latents").iterdir()} == want

    # other settings: nothing is kept
    monkeypatch.undo()
    params = parse_params(
        {"paths": {"data": str(data), "models": str(tiny_backbone.parent)}, "latents": {"shard_size": 2}}
    )
    assert build_latents(params)["resumed_shards"] == 0


def test_build_latents_without_clips(tmp_path: Path) -> None:
    from pickstyle.data.shards import ShardError

    params = parse_params({"paths": {"data": str(tmp_path / "data"), "models": str(tmp_path / "models")}})
    with pytest.raises(ShardError, match="no clips"):
        build_latents(params)
