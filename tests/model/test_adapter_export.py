"""Adapter interoperability: export to the original Wan / PickStyle and ComfyUI key names, round trips, and stock
diffusers ``WanVACEPipeline.load_lora_weights`` on our adapter file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pickstyle.model.adapters import (
    WEIGHT_NAME,
    AdapterError,
    export_adapter,
    import_official_adapter,
    load_adapter,
    save_adapter,
)
from pickstyle.model.components import load_pipeline
from tests.model.test_adapters import _forward, _trained_pipe


@pytest.fixture
def adapter(tiny_backbone: Path, tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A saved adapter with alpha != rank (scale 4) and the transformer output it gives."""
    pipe = _trained_pipe(tiny_backbone, rank=4, alpha=16.0)
    return save_adapter(pipe, tmp_path / "adapter"), _forward(pipe.transformer)


def _deltas(state: dict[str, torch.Tensor], pattern: str, scale_of) -> dict[tuple[int, str], torch.Tensor]:
    """ΔW = scale · B A per (block, projection), from any key naming."""
    out = {}
    for key, a in state.items():
        m = re.fullmatch(pattern, key)
        if m and m["ab"] == "A":
            b = state[key[: m.start("ab")] + "B" + key[m.end("ab") :]]
            out[(int(m["block"]), m["proj"])] = scale_of(key) * (b @ a)
    return out


def test_wan_export_round_trips_through_the_import(adapter, tiny_backbone: Path, tmp_path: Path) -> None:
    """export (.pth, original names, alpha folded into B) -> the existing import -> the same outputs."""
    folder, expected = adapter
    summary = export_adapter(folder, tmp_path / "pickstyle.pth", fmt="wan")
    assert (summary["rank"], summary["alpha"]) == (4, 16.0)
    state = torch.load(tmp_path / "pickstyle.pth", weights_only=True)
    assert all(
        re.fullmatch(r"vace_blocks\.\d+\.self_attn\.[qkv]\.lora_[AB]\.default\.weight", k) for k in state
    )

    imported = import_official_adapter(tmp_path / "pickstyle.pth", tmp_path / "imported")
    assert imported["alpha"] == 4.0  # the reference's alpha = r; the scale now lives in B
    fresh = load_pipeline(tiny_backbone)
    load_adapter(fresh, tmp_path / "imported")
    torch.testing.assert_close(_forward(fresh.transformer), expected, rtol=1e-5, atol=1e-5)


def test_comfyui_export_keeps_every_delta(adapter, tmp_path: Path) -> None:
    folder, _ = adapter
    export_adapter(folder, tmp_path / "pickstyle_comfy.safetensors", fmt="comfyui")
    comfy = load_file(tmp_path / "pickstyle_comfy.safetensors")
    ours = load_file(folder / WEIGHT_NAME)
    assert all(k.startswith("diffusion_model.vace_blocks.") for k in comfy)
    alphas = {k: v for k, v in comfy.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 16.0 for v in alphas.values())
    want = _deltas(
        ours,
        r"transformer\.vace_blocks\.(?P<block>\d+)\.attn1\.to_(?P<proj>[qkv])\.lora_(?P<ab>[AB])\.weight",
        lambda k: 4.0,
    )
    got = _deltas(
        comfy,
        r"diffusion_model\.vace_blocks\.(?P<block>\d+)\.self_attn\.(?P<proj>[qkv])\.lora_(?P<ab>[AB])\.weight",
        lambda k: float(comfy[k.rsplit(".lora_", 1)[0] + ".alpha"]) / comfy[k].shape[0],
    )
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_export_cli_and_errors(adapter, tmp_path: Path) -> None:
    from pickstyle.cli import main

    folder, _ = adapter
    assert (
        main(["export-adapter", str(folder), "-o", str(tmp_path / "x.safetensors"), "--format", "comfyui"])
        == 0
    )
    assert (tmp_path / "x.safetensors").is_file()
    with pytest.raises(AdapterError, match="unknown export format"):
        export_adapter(folder, tmp_path / "y.pth", fmt="kohya")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        export_adapter(tmp_path, tmp_path / "z.pth")


def test_stock_diffusers_loads_our_adapter_file(adapter, tiny_backbone: Path) -> None:
    """Plain ``WanVACEPipeline.load_lora_weights`` (no pickstyle code) on our file: alpha kept, same outputs."""
    from diffusers import WanVACEPipeline

    folder, expected = adapter
    pipe = WanVACEPipeline.from_pretrained(tiny_backbone)
    pipe.load_lora_weights(str(folder / WEIGHT_NAME), adapter_name="style")
    assert pipe.transformer.peft_config["style"].lora_alpha == 16.0
    torch.testing.assert_close(_forward(pipe.transformer), expected)
