"""MLflow registry: absolute tracking URI, one version per adapter, aliases, the champion gate, pyfunc serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pickstyle import register, tracking
from pickstyle.config import parse_params
from pickstyle.model.components import backbone_fingerprint

MODEL = "pickstyle-test"


@pytest.fixture(scope="module")
def adapters(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four tiny adapters with different (non-zero) weights, saved in diffusers LoRA format."""
    from pickstyle.model.adapters import add_context_style_adapter, save_adapter
    from pickstyle.model.components import load_pipeline

    pipe = load_pipeline(tiny_backbone)
    add_context_style_adapter(pipe.transformer, rank=4, alpha=4.0)
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, name in enumerate("abcd"):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in pipe.transformer.named_parameters():
                if ".lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = save_adapter(pipe, root / name)
    return out


@pytest.fixture
def project(tmp_path: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch):
    """A working directory with the tiny backbone in models/, MLflow in tmp_path, no env overrides."""
    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_backbone, tmp_path / "models" / "backbone")
    params = parse_params({"register": {"model_name": MODEL}, "sample": {"steps": 2}})
    return params


def _put(
    params, adapter: Path, metric: float | None, se: float | None = None, split: str | None = None
) -> None:
    dst = Path(params.paths.models) / "adapter"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(adapter, dst)
    (dst / "checkpoints").mkdir()  # training state never counts towards the adapter's identity
    (dst / "checkpoints" / "junk.bin").write_bytes(np.random.bytes(64))
    eval_dir = Path(params.paths.eval)
    eval_dir.mkdir(exist_ok=True)
    metrics = {"cs_cfg/warp_error": 0.01} | (
        {params.register.gate_metric: metric} if metric is not None else {}
    )
    if se is not None:
        metrics[f"{params.register.gate_metric}_se"] = se
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    info = eval_dir / "evaluation.json"
    info.unlink(missing_ok=True)
    if split is not None:  # as pickstyle.evaluate writes it
        info.write_text(json.dumps({"split": split, "clips": 2, "variants": ["cs_cfg"]}))


def test_tracking_uri_is_absolute_and_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    params = parse_params({})
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_root(params) == tmp_path.resolve() / "mlartifacts"
    # Inside `dvc exp run --temp` the cwd is a throw-away copy: anchor at the parent repository (DVC_ROOT).
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri(params) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking.tracking_uri(params) == "sqlite:////elsewhere/m.db"
    assert tracking.artifact_root(params) == Path("/elsewhere/mlartifacts")
    monkeypatch.setenv("PICKSTYLE_MLFLOW_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(params) == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("value", "champion", "higher", "margin", "expected"),
    [
        (1.0, None, True, 0.0, True),  # no champion value: promote
        (None, None, True, 0.0, False),  # ...but never an unevaluated challenger
        (float("nan"), float("nan"), True, 0.0, False),
        (None, 1.0, True, 0.0, False),  # challenger never measured: keep the champion
        (float("nan"), 1.0, True, 0.0, False),
        (1.5, 1.0, True, 0.5, True),
        (1.4, 1.0, True, 0.5, False),
        (0.9, 1.0, True, 0.0, False),
        (0.9, 1.0, False, 0.0, True),  # lower is better
        (0.9, 1.0, False, 0.2, False),
    ],
)
def test_gate(value, champion, higher, margin, expected) -> None:
    assert register.gate_passes(value, champion, higher, margin) is expected


def test_register_versions_aliases_gate_tags_and_serving(
    project, adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    params = project
    monkeypatch.setenv("DVC_EXP_NAME", "exp-anime")
    _put(params, adapters["a"], 20.0)
    first = register.register(params, flow_run_id="flow-123")
    assert first["created"] and first["version"] == 1 and first["promoted"]
    assert first["champion"] == 1 and first["challenger"] == 1
    assert json.loads((Path(params.paths.models) / "registered.json").read_text())["version"] == 1
    from flows.register import registration_markdown

    md = registration_markdown(first)
    assert f"# Registered `{MODEL}` version 1" in md and "| promoted | True |" in md

    uri = tracking.tracking_uri(params)
    client = MlflowClient(uri, registry_uri=uri)
    v1 = client.get_model_version(MODEL, "1")
    assert v1.tags["adapter_sha256"] == register.adapter_sha256(adapters["a"])
    assert v1.tags["prefect_flow_run_id"] == "flow-123"
    assert v1.tags["dvc_exp_name"] == "exp-anime"
    assert v1.tags["params_hash"] == params.section_hash()
    assert "git_revision" in v1.tags and "backbone_fingerprint" in v1.tags
    assert float(v1.tags[f"eval.{params.register.gate_metric}"]) == 20.0
    # the experiment's artifact location is absolute, under the project
    exp = client.get_experiment_by_name(params.register.experiment)
    assert exp.artifact_location.startswith(Path.cwd().resolve().as_uri())

    # The same adapter again (new checkpoints, new metrics): no new version.
    _put(params, adapters["a"], 99.0)
    again = register.register(params)
    assert not again["created"] and again["version"] == 1
    assert "no new version" in registration_markdown(again)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

    # A worse adapter: a new version, @challenger moves, @champion stays.
    _put(params, adapters["b"], 19.0)
    worse = register.register(params)
    assert worse["version"] == 2 and not worse["promoted"]
    assert int(client.get_model_version_by_alias(MODEL, "challenger").version) == 2
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1

    # Better, but within the noise (gain 2 dB < 2 standard errors of 1.5 dB): @champion stays.
    _put(params, adapters["d"], 22.0, se=1.5)
    noisy = register.register(params)
    assert noisy["version"] == 3 and not noisy["promoted"] and noisy["gate"]["margin"] == 3.0
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1

    # Clearly better, but evaluated on the validation clips (for tuning): not registered at all, MLflow untouched,
    # so the same adapter evaluated on the test clips is a new version below.
    params.register.gate_margin = 2.0
    _put(params, adapters["c"], 25.0, se=1.0, split="val")
    tuned = register.register(params)
    assert tuned["version"] is None and not tuned["created"] and tuned["split"] == "val"
    assert "only a test-split evaluation is registered" in registration_markdown(tuned)
    assert json.loads((Path(params.paths.models) / "registered.json").read_text())["version"] is None
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 3
    (Path(params.paths.eval) / "evaluation.json").write_text("{not json")
    with pytest.raises(register.RegistryError, match=r"evaluation.json: not an evaluation record"):
        register.register(params)

    # Clearly better (by more than the margin and the spread) on the test clips: becomes champion.
    _put(params, adapters["c"], 25.0, se=1.0, split="test")
    best = register.register(params)
    assert best["version"] == 4 and best["promoted"] and best["champion"] == 4
    assert best["gate"]["champion_value"] == 20.0 and best["gate"]["passed"]
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 4
    assert int(client.get_model_version_by_alias(MODEL, "challenger").version) == 4
    hits = register.find_versions(params, MODEL, adapter_sha256=best["adapter_sha256"])
    assert [h["version"] for h in hits] == [4] and hits[0]["aliases"] == ["challenger", "champion"]

    # Serving: the champion, loaded by alias, stylizes a clip of any size (fitted to the profile's 64x96).
    _check_serving(params, tmp_path)


def _check_serving(params, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from pickstyle.data.video import read_video, write_video

    info = register.load_registered(f"models:/{MODEL}@champion", params)
    assert (Path(info["adapter_dir"]) / register.ADAPTER_FILES[0]).is_file()
    assert (Path(info["backbone_dir"]) / "model_index.json").is_file()
    assert info["params"]["register"]["model_name"] == MODEL

    clip = np.random.default_rng(0).integers(0, 255, (5, 40, 72, 3), dtype=np.uint8)
    write_video(tmp_path / "in.mp4", clip, fps=8)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = pd.DataFrame(
        {
            "video": [str(tmp_path / "in.mp4")],
            "prompt": ["anime style. noise"],
            "output": [str(tmp_path / "o.mp4")],
        }
    )
    frame["steps"] = [2]
    out = model.predict(frame)
    assert out == [str(tmp_path / "o.mp4")]
    frames, fps = read_video(out[0])
    assert frames.shape == (5, 64, 96, 3) and fps == pytest.approx(8)


def test_register_without_adapter_is_a_clear_error(project) -> None:
    with pytest.raises(register.RegistryError, match="no trained adapter"):
        register.register(project)


def test_per_style_adapters_register_as_one_model(project, tiny_backbone: Path, tmp_path: Path) -> None:
    """The tiny profile's per-style folder is one registered model: its index and every style's adapter files
    (not their checkpoints or plots), the same hash before and after the round trip."""
    from pickstyle.model.adapters import AdapterSet
    from tests.projects import random_style_adapters

    folder = random_style_adapters(tiny_backbone, tmp_path / "styles", ("anime", "sepia"))
    (folder / "sepia" / "loss.png").write_bytes(b"png")
    _put(project, folder, 20.0)
    out = register.register(project)
    info = register.load_registered(f"models:/{MODEL}@champion", project)
    pulled = AdapterSet.open(info["adapter_dir"])
    assert pulled.per_style and set(pulled.styles) == {"anime", "sepia"}
    assert pulled.sha256() == out["adapter_sha256"] == AdapterSet.open(folder).sha256()
    assert not (Path(info["adapter_dir"]) / "sepia" / "loss.png").exists()
    assert not (Path(info["adapter_dir"]) / "checkpoints").exists()


def test_use_tracking_leaves_the_environment_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in tracking.URI_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.use_tracking(parse_params({}))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; it must not turn into a sticky "user override"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    other = parse_params({"paths": {"mlflow_db": "other.db"}})
    assert tracking.tracking_uri(other).endswith("/other.db")


def test_real_profiles_record_the_backbone_instead_of_copying_it(project, adapters, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    backbone = tmp_path / "models" / "backbone"  # stands in for a local Wan2.1-VACE folder
    params = parse_params(
        {"profile": "wan-1.3b", "model": {"path": "models/backbone"}, "register": {"model_name": "real"}}
    )
    _put(params, adapters["a"], 20.0)
    out = register.register(params)
    uri = tracking.tracking_uri(params)
    version = MlflowClient(uri, registry_uri=uri).get_model_version("real", str(out["version"]))
    assert version.tags["backbone_path"] == str(backbone.resolve())
    assert version.tags["backbone_fingerprint"] == backbone_fingerprint(backbone)
    info = register.load_registered("models:/real@champion", params)
    assert info["backbone_dir"] == str(backbone.resolve())
    assert not (Path(info["model_dir"]) / "artifacts" / "backbone").exists()


def test_adapter_identity_ignores_safetensors_metadata_order(tmp_path) -> None:
    """safetensors writes its metadata map in a per-process random order: the same adapter must hash the same."""
    import json as _json
    import struct

    data = bytes(range(16))
    tensors = {"transformer.x.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    shas = []
    for i, meta in enumerate(({"format": "pt", "lora": "{}"}, {"lora": "{}", "format": "pt"})):
        header = _json.dumps({"__metadata__": meta, **tensors}).encode()
        folder = tmp_path / f"a{i}"
        folder.mkdir()
        (folder / "pytorch_lora_weights.safetensors").write_bytes(
            struct.pack("<Q", len(header)) + header + data
        )
        shas.append(register.adapter_sha256(folder))
    assert shas[0] == shas[1]
    (tmp_path / "a1" / "pytorch_lora_weights.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(reversed(data))
    )
    assert register.adapter_sha256(tmp_path / "a1") != shas[0]  # different weights: a different adapter


def test_runs_are_named_by_style_and_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (tracking.STYLE_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    params = parse_params({"pairs": {"styles": ["anime", "sketch"]}})
    assert tracking.style_of(params) == "anime+sketch"
    assert tracking.run_name("train", params) == "train-anime+sketch-workspace"
    many = parse_params({"pairs": {"styles": ["anime", "sketch", "sepia", "pixel", "watercolor", "anime2"]}})
    assert tracking.run_name("train", many) == "train-6-styles-workspace"
    imported = parse_params({"pairs": {"source": "omniconsistency", "root": "/data/omni"}})
    assert tracking.style_of(imported) == "omniconsistency"
    # inside the retrain flow's DVC experiment: its style and experiment name
    monkeypatch.setenv(tracking.STYLE_ENV, "lego")
    monkeypatch.setenv("DVC_EXP_NAME", "retrain-lego-0102")
    assert tracking.run_name("train", imported) == "train-lego-retrain-lego-0102"
