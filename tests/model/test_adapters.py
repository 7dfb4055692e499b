"""Context-style adapters: placement, freezing, save/load round trip with alpha, official checkpoint import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pickstyle.config import TinyBackbone
from pickstyle.model.adapters import (
    CONTEXT_STYLE_TARGETS,
    STYLES_NAME,
    WEIGHT_NAME,
    AdapterError,
    AdapterSet,
    adapter_sha256,
    add_context_style_adapter,
    import_official_adapter,
    load_adapter,
    lora_parameter_count,
    read_adapter_info,
    save_adapter,
)
from pickstyle.model.components import load_pipeline, tiny_latent_geometry
from tests.projects import random_adapter, random_style_adapters

C, F, H, W = tiny_latent_geometry(TinyBackbone(), 9, 64, 96)
Z = TinyBackbone().vae_z_dim  # latent channels


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, Z, F, H, W, generator=g),  # [b, c, f, h, w]
        "control_hidden_states": torch.randn(1, C, F, H, W, generator=g),
        "encoder_hidden_states": torch.randn(1, 32, 32, generator=g),  # [b, L, text_dim]
        "timestep": torch.tensor([500]),
        "return_dict": False,
    }


@torch.no_grad()
def _forward(transformer: torch.nn.Module) -> torch.Tensor:
    return transformer(**_inputs())[0]


def _trained_pipe(backbone: Path, rank: int = 4, alpha: float = 16.0):
    """A pipeline with an adapter whose B is non-zero (as after training), so the adapter changes the output."""
    pipe = load_pipeline(backbone)
    add_context_style_adapter(pipe.transformer, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pipe


def test_only_context_self_attention_lora_trains(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    before = _forward(pipe.transformer)
    add_context_style_adapter(pipe.transformer, rank=4, alpha=4.0)
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    pattern = re.compile(r"vace_blocks\.\d+\.attn1\.to_[qkv]\.lora_[AB]\.default\.weight")
    assert all(pattern.fullmatch(n) for n in trainable), trainable
    # VACE blocks x q, k, v x (A: r x dim + B: dim x r)
    cfg = pipe.transformer.config
    n_vace, dim = len(cfg.vace_layers), cfg.num_attention_heads * cfg.attention_head_dim
    assert lora_parameter_count(pipe.transformer) == n_vace * 3 * (4 * dim + dim * 4)
    assert {n.split(".lora_")[0] for n in trainable} == {
        f"vace_blocks.{b}.attn1.to_{p}" for b in range(n_vace) for p in "qkv"
    }
    assert not any(n.startswith("blocks.") for n in trainable)  # main blocks' attn1 untouched
    # B starts at zero: a fresh adapter leaves the output unchanged
    assert torch.equal(_forward(pipe.transformer), before)


def test_bad_targets_are_rejected(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    with pytest.raises((AdapterError, ValueError)):
        add_context_style_adapter(pipe.transformer, rank=2, alpha=2.0, targets=r"nothing\.here")


def test_save_load_round_trip_keeps_alpha(tiny_backbone: Path, tmp_path: Path) -> None:
    pipe = _trained_pipe(tiny_backbone, rank=4, alpha=16.0)  # alpha != rank: scale 4
    expected = _forward(pipe.transformer)
    out = save_adapter(pipe, tmp_path / "adapter", extra_metadata={"steps": 7})
    info = read_adapter_info(out)
    assert (info["rank"], info["alpha"], info["steps"], info["targets"]) == (
        4,
        16.0,
        7,
        CONTEXT_STYLE_TARGETS,
    )

    fresh = load_pipeline(tiny_backbone)
    base = _forward(fresh.transformer)
    assert not torch.allclose(base, expected)
    load_adapter(fresh, out)
    assert fresh.transformer.peft_config["pickstyle"].lora_alpha == 16.0
    assert torch.equal(_forward(fresh.transformer), expected)
    load_adapter(fresh, out, scale=0.0)  # reload under the same name, switched off
    assert torch.equal(_forward(fresh.transformer), base)


def test_the_same_adapter_saves_to_the_same_bytes(tiny_backbone: Path, tmp_path: Path) -> None:
    # safetensors writes its metadata map (format + the LoRA config) in a random order per save; DVC's md5 of
    # models/adapter must not depend on it
    pipe = _trained_pipe(tiny_backbone)
    saved = {(save_adapter(pipe, tmp_path / f"a{i}") / WEIGHT_NAME).read_bytes() for i in range(8)}
    assert len(saved) == 1


def test_load_adapter_missing_folder(tiny_backbone: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(load_pipeline(tiny_backbone), tmp_path)


def _official_state(pipe) -> dict[str, torch.Tensor]:
    """The adapter of ``pipe`` renamed as the official checkpoints name it (DataParallel ``module.`` prefix)."""
    state = {}
    for name, p in pipe.transformer.named_parameters():
        m = re.fullmatch(r"vace_blocks\.(\d+)\.attn1\.to_([qkv])\.lora_([AB])\.default\.weight", name)
        if m:
            state[f"module.vace_blocks.{m[1]}.self_attn.{m[2]}.lora_{m[3]}.default.weight"] = (
                p.detach().clone()
            )
    return state


def test_import_official_checkpoint(tiny_backbone: Path, tmp_path: Path) -> None:
    pipe = _trained_pipe(tiny_backbone, rank=4, alpha=4.0)
    expected = _forward(pipe.transformer)
    pth = tmp_path / "pickstyle.pth"
    torch.save(_official_state(pipe), pth)

    summary = import_official_adapter(pth, tmp_path / "imported")
    n_vace = len(pipe.transformer.config.vace_layers)
    assert (summary["rank"], summary["alpha"], summary["modules"], summary["blocks"]) == (
        4,
        4.0,
        3 * n_vace,
        list(range(n_vace)),
    )
    fresh = load_pipeline(tiny_backbone)
    load_adapter(fresh, tmp_path / "imported")
    assert torch.equal(_forward(fresh.transformer), expected)

    # alpha given explicitly is kept (scale alpha / r = 2)
    assert import_official_adapter(pth, tmp_path / "alpha8", alpha=8.0)["alpha"] == 8.0
    load_adapter(fresh, tmp_path / "alpha8")
    assert fresh.transformer.peft_config["pickstyle"].lora_alpha == 8.0
    assert not torch.allclose(_forward(fresh.transformer), expected)


def test_import_rejects_unknown_keys(tiny_backbone: Path, tmp_path: Path) -> None:
    state = _official_state(_trained_pipe(tiny_backbone))
    state["module.blocks.0.self_attn.q.weight"] = torch.zeros(32, 32)
    pth = tmp_path / "bad.pth"
    torch.save(state, pth)
    with pytest.raises(AdapterError, match=r"module\.blocks\.0\.self_attn\.q\.weight"):
        import_official_adapter(pth, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterError, match="not a loadable"):
        import_official_adapter(tmp_path / "junk.pth", tmp_path / "out")


def test_convert_official_keys_without_adapter_segment() -> None:
    from pickstyle.model.adapters import convert_official_state_dict

    state = {
        "vace_blocks.3.self_attn.k.lora_A.weight": torch.zeros(8, 32),
        "vace_blocks.3.self_attn.k.lora_B.weight": torch.zeros(32, 8),
    }
    out, rank = convert_official_state_dict(state)
    assert rank == 8 and sorted(out) == [
        "vace_blocks.3.attn1.to_k.lora_A.weight",
        "vace_blocks.3.attn1.to_k.lora_B.weight",
    ]
    with pytest.raises(AdapterError, match="only one of"):
        convert_official_state_dict({"vace_blocks.3.self_attn.k.lora_A.weight": torch.zeros(8, 32)})
    mixed = {**state, "vace_blocks.4.self_attn.q.lora_A.other.weight": torch.zeros(8, 32)}
    with pytest.raises(AdapterError, match="several adapters"):
        convert_official_state_dict(mixed)


def test_adapter_set_picks_the_style_the_prompt_names(tiny_backbone: Path, tmp_path: Path) -> None:
    """A per-style folder: every adapter loads under its style's name, the prompt's style is the one active."""
    folder = random_style_adapters(tiny_backbone, tmp_path / "adapter", ("anime", "sepia", "pixel"))
    adapters = AdapterSet.open(folder)
    assert adapters.per_style and list(adapters.folders) == ["anime", "pixel", "sepia"]
    assert adapters.pick("Sepia style. a wolf") == "sepia"
    assert adapters.pick("a wolf, pixel-art") == "pixel"  # any case, a whole word
    assert adapters.pick("Anime style. a sepia photo") == "anime"  # the first style named
    assert adapters.pick("anything", style="pixel") == "pixel"
    with pytest.raises(AdapterError, match="names none of the styles"):
        adapters.pick("Watercolor style. a wolf")
    with pytest.raises(AdapterError, match="no 'oil' adapter"):
        adapters.pick("Anime style.", style="oil")
    with pytest.raises(AdapterError, match="names none"):
        adapters.pick("animation")  # not the word "anime"

    pipe = load_pipeline(tiny_backbone)
    before = _forward(pipe.transformer)
    adapters.load(pipe, scale=1.0)
    outs = {}
    for style in adapters.styles:
        assert adapters.activate(pipe, f"{style} style. x", 1.0) == style
        outs[style] = _forward(pipe.transformer)
    assert not torch.allclose(outs["anime"], outs["sepia"])  # each style its own adapter
    adapters.activate(pipe, "Anime style. x", 0.0)
    assert torch.equal(_forward(pipe.transformer), before)  # scale 0: the backbone alone
    adapters.activate(pipe, "Anime style. x", 1.0)
    assert torch.equal(_forward(pipe.transformer), outs["anime"])

    # the folder's hash follows every style's weights
    sha = adapters.sha256()
    random_adapter(tiny_backbone, folder / "pixel", seed=9)
    assert AdapterSet.open(folder).sha256() != sha


def test_adapter_set_layouts_and_errors(tiny_backbone: Path, tmp_path: Path) -> None:
    joint = random_adapter(tiny_backbone, tmp_path / "joint")
    adapters = AdapterSet.open(joint)
    assert not adapters.per_style and adapters.pick("any prompt at all") == "pickstyle"
    assert adapters.sha256() == adapter_sha256(joint)
    one = random_style_adapters(tiny_backbone, tmp_path / "one", ("sepia",))
    assert AdapterSet.open(one).pick("Anime style. a wolf") == "sepia"  # a one-style folder serves any prompt
    with pytest.raises(AdapterError, match="not an adapter folder"):
        AdapterSet.open(tmp_path)
    broken = random_style_adapters(tiny_backbone, tmp_path / "broken")
    (broken / "sepia" / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(AdapterError, match="the 'sepia' adapter of .* is missing"):
        AdapterSet.open(broken)
    (broken / STYLES_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not a per-style adapter index"):
        AdapterSet.open(broken)
