import shutil
from pathlib import Path

import pytest
import yaml

from pickstyle.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.profile == "tiny"
    assert params.active.backbone == "tiny"
    assert (params.active.frames - 1) % 4 == 0
    assert params.active.height % 16 == 0 and params.active.width % 16 == 0


def _dotted(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        if isinstance(v, dict) and v and k not in ("motion_mix", "schedules"):
            keys |= _dotted(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def test_shipped_params_are_complete():
    """params.yaml spells out every key, so what DVC tracks is what runs; ``evaluate.sample`` holds only what
    differs from ``sample`` (the evaluate stage tracks both)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = parse_params({}).model_dump(mode="json")
    inherited = {k for k in _dotted(defaults) if k.startswith("evaluate.sample.")}
    assert _dotted(data) - {"evaluate.sample"} == _dotted(defaults) - inherited
    assert parse_params(data).model_dump() == parse_params({}).model_dump()  # and the defaults match


@pytest.mark.parametrize(
    ("tree", "needle"),
    [
        ({"train": {"stpes": 3}}, "train.stpes: unknown key"),
        ({"pairs": {"per_style": 4, "colour": 1}}, "pairs.colour: unknown key"),
        ({"tpyo": 1}, "tpyo: unknown key"),
        ({"model": {"tiny": {"layers": 2}}}, "model.tiny.layers: unknown key"),
    ],
)
def test_typo_fails_with_its_name(tree, needle):
    with pytest.raises(ParamsError, match=needle.replace(".", r"\.")):
        parse_params(tree)


def test_frames_and_sizes_validated_with_field_name():
    with pytest.raises(ParamsError, match=r"profiles\.tiny\.frames: .*4n\+1"):
        parse_params({"profiles": {"tiny": {"backbone": "tiny", "frames": 10, "height": 64, "width": 64}}})
    with pytest.raises(ParamsError, match=r"profiles\.tiny\.width: .*multiple of 16"):
        parse_params({"profiles": {"tiny": {"backbone": "tiny", "frames": 9, "height": 64, "width": 70}}})


def test_tiny_patch_must_fit_the_transformer_width():
    """z x patch latent values per token must stay under the width, or sampling leaves noise in every latent."""
    with pytest.raises(ParamsError, match=r"model\.tiny.*256 latent values in a token of width 128"):
        parse_params({"model": {"tiny": {"vae_z_dim": 16}}})
    wide = {"num_attention_heads": 4, "attention_head_dim": 72, "vae_z_dim": 16}  # 256 < 288
    assert parse_params({"model": {"tiny": wide}}).model.tiny.vae_z_dim == 16


def test_unknown_profile():
    with pytest.raises(ParamsError, match="profile 'nope' is not one of"):
        parse_params({"profile": "nope"})


def test_overrides_and_lora_defaults(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: tiny\ntrain:\n  steps: 7\n")
    params = load_params(p, {"train.lr": 0.1, "profile": "wan-1.3b"})
    assert params.train.steps == 7 and params.train.lr == 0.1
    assert params.lora_rank == 128 and params.lora_alpha == 128
    assert load_params(p).lora_rank == 32


def test_training_defaults_are_the_profiles():
    """Null train.lr/lr_schedule/shift/weighting take the profile's: the paper's on the real profiles, the tiny
    profile's measured ones (README: Two commands)."""
    tiny, real = parse_params({}).train, parse_params({"profile": "wan-1.3b"}).train
    assert (tiny.lr, tiny.lr_schedule, tiny.shift, tiny.weighting, tiny.steps, tiny.frame_window) == (
        2e-3,
        "cosine",
        12.0,
        "none",
        650,
        3,
    )
    # one adapter per style on the tiny profile (650 steps each), the paper's one for all on the real ones
    assert (tiny.adapters, parse_params({"profile": "wan-1.3b"}).train.adapters) == ("per_style", "joint")
    assert (real.lr, real.lr_schedule, real.shift, real.weighting, real.steps, real.frame_window) == (
        5.6e-4,
        "constant",
        5.0,
        "bell",
        3000,
        None,
    )
    mine = parse_params({"profile": "wan-1.3b", "train": {"shift": 3.0, "lr_schedule": "cosine"}}).train
    assert (mine.shift, mine.lr_schedule, mine.weighting) == (3.0, "cosine", "bell")


def test_bad_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(p)


def test_default_negative_prompt_is_wans_byte_for_byte() -> None:
    """Wan2.1's ``sample_neg_prompt`` (wan/configs/shared_config.py); both null-text branches of CS-CFG use it."""
    from pickstyle.config import WAN_NEGATIVE_PROMPT

    wan = (
        "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
        "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
        "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
    )
    assert WAN_NEGATIVE_PROMPT.encode("utf-8") == wan.encode("utf-8")
    assert "丑陋的，残缺的，" in WAN_NEGATIVE_PROMPT


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--c-guide", "nan"], "--c-guide: must be finite"),
        (["--t-guide", "-1"], "--t-guide: must be >= 0"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--steps", "4", "--skip", "4"], "--skip: must be < steps (4)"),
        (["--skip", "-1"], "--skip: must be >= 0"),
        (["--shift", "inf"], "--shift: must be finite"),
        (["--cache-threshold", "-0.1"], "--cache-threshold: must be >= 0"),
    ],
)
def test_stylize_rejects_bad_sampling_values_in_one_line(tmp_path, capsys, flags, message):
    """Checked before the video is read or a model is loaded (the input does not even exist)."""
    from pickstyle.cli import main

    argv = ["stylize", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4"), "--prompt", "p"]
    assert main([*argv, "--params", str(tmp_path / "none.yaml"), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"pickstyle stylize: error: {message}\n"
    assert not (tmp_path / "o.mp4").exists()


def test_sampling_values_validated_in_params():
    with pytest.raises(ParamsError, match=r"sample\.c_guide: must be finite"):
        parse_params({"sample": {"c_guide": float("nan")}})
    with pytest.raises(ParamsError, match=r"evaluate\.sample\.skip: must be < steps \(8\)"):
        parse_params({"evaluate": {"sample": {"steps": 8, "skip": 8}}})
    # steps and skip overridden together are checked together
    assert parse_params({}, overrides={"sample.steps": 4, "sample.skip": 3}).sample.skip == 3


def test_one_sampling_schema():
    """The stylize flags, the served model's override columns and evaluate.sample all come from Sample."""
    from pickstyle.cli import build_parser
    from pickstyle.config import GUIDANCE_MODES, SCHEDULERS, Sample
    from pickstyle.model.schedulers import make_scheduler
    from pickstyle.serving import OVERRIDE_COLUMNS

    stylize = build_parser()._subparsers._group_actions[0].choices["stylize"]
    flags = {a.dest for a in stylize._actions}
    assert set(Sample.model_fields) <= flags
    assert set(Sample.model_fields) - {"device"} <= set(OVERRIDE_COLUMNS)
    guidance = next(a for a in stylize._actions if a.dest == "guidance")
    assert tuple(guidance.choices) == GUIDANCE_MODES
    for name in SCHEDULERS:
        make_scheduler(name, 3.0)
    # one guider class per mode: the config's modes are exactly the guiders'
    from pickstyle.model.guiders import GUIDERS

    assert tuple(GUIDERS) == GUIDANCE_MODES

    # evaluate.sample holds only what differs from sample; steps/t_guide/c_guide come from the profile
    params = parse_params(
        {"sample": {"shift": 9.0, "scheduler": "euler"}, "evaluate": {"sample": {"scheduler": "unipc"}}}
    )
    ev = params.evaluate.sample
    assert (ev.shift, ev.scheduler) == (9.0, "unipc")
    assert (ev.steps, ev.t_guide, ev.c_guide) == (3, 1.0, 0.0)  # the tiny profile's eval_*
    again = parse_params(params.model_dump(mode="json"))  # resolved params load back to the same values
    assert again.evaluate.sample == ev


def test_shipped_params_survive_dvc_exp_run_set(tmp_path):
    """``dvc exp run -S`` (and the retrain-style flow) rewrites params.yaml through DVC's YAML round trip, which
    drops the regexes' quotes: inside a ``{...}`` mapping that no longer parses. Twice, as two experiments would."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", ["++train.steps=600", "++pairs.styles=['sepia']"])
    apply_overrides(tmp_path / "params.yaml", ["++train.lr=3e-4"])
    changed = yaml.safe_load((tmp_path / "params.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert changed["train"]["steps"] == 600 and changed["pairs"]["styles"] == ["sepia"]
    assert changed["profiles"] == shipped["profiles"]
    parse_params(changed)
