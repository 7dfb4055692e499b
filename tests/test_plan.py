"""``pickstyle plan``: exact parameter counts from configs alone, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pickstyle.config import TinyBackbone, load_params
from pickstyle.model.components import real_config, tiny_transformer_config
from pickstyle.plan import lora_parameters, plan, transformer_parameters

ROOT = Path(__file__).resolve().parents[1]


def _actual(model: torch.nn.Module) -> dict[str, int]:
    counts = {"main": 0, "vace": 0, "other": 0}
    for name, p in model.named_parameters():
        part = "main" if name.startswith("blocks.") else "vace" if name.startswith("vace") else "other"
        counts[part] += p.numel()
    return {**counts, "total": sum(counts.values())}


@pytest.mark.parametrize("which", ["tiny", "real-layout"])
def test_counts_match_instantiated_model(which: str) -> None:
    from diffusers import WanVACETransformer3DModel

    from pickstyle.model.adapters import add_context_style_adapter, lora_parameter_count
    from tests.real_layout import transformer_config

    config = tiny_transformer_config(TinyBackbone()) if which == "tiny" else transformer_config("wan-1.3b")
    model = WanVACETransformer3DModel(**config)
    assert transformer_parameters(config) == _actual(model)
    add_context_style_adapter(model, 8, 8.0)
    assert lora_parameters(config, 8) == lora_parameter_count(model)


@pytest.mark.parametrize("name", ["wan-1.3b", "wan-14b"])
def test_counts_match_the_published_sizes(name: str) -> None:
    """The real configs, instantiated on the meta device (no memory): the formula is exact there too."""
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        model = WanVACETransformer3DModel(**real_config(name))
    assert transformer_parameters(real_config(name)) == _actual(model)
    # the paper's adapter sizes: ~17.7 M (1.3B), ~31.5 M (14B)
    assert lora_parameters(real_config(name), 128) == {"wan-1.3b": 17_694_720, "wan-14b": 31_457_280}[name]


def test_plan_numbers_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from pickstyle.cli import main

    real = plan(load_params(ROOT / "params.yaml", {"profile": "wan-1.3b"}))
    assert real["geometry"]["tokens"] == 32_760  # 81x480x832 (docs/method.md §2)
    assert real["parameters"]["lora"] == 17_694_720
    act = real["memory"]["activations"]
    assert act["checkpointing"]["gpu"] < act["none"]["gpu"] / 10
    assert act["checkpointing+offload"]["gpu"] <= act["checkpointing"]["gpu"]
    assert 40 < real["latent_cache_per_clip"]["total"] / 2**20 < 50
    small = plan(load_params(ROOT / "params.yaml", {"profile": "wan-1.3b"}), frames=17, height=240, width=416)
    assert small["geometry"]["tokens"] == 5 * 15 * 26

    assert main(["plan", "--params", str(ROOT / "params.yaml"), "-S", "profile=wan-14b"]) == 0
    out = capsys.readouterr().out
    assert "dim 5120, 40 layers, 40 heads, ffn 13824, 8 VACE blocks" in out and "31,457,280" in out
    assert main(["plan", "--params", str(ROOT / "params.yaml"), "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["parameters"]["lora_rank"] == 32 and tiny["geometry"]["tokens"] == 864
