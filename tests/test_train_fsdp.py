"""FSDP2 training: only the LoRA tensors are gathered, checkpoints hold sharded optimizer state, loading is
RAM-efficient, and the adapter equals the one of an un-sharded (DDP) run on the same data."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pickstyle import checkpoints as ckpt
from pickstyle.model.trainable import empty_transformer
from tests.procs import run_group
from tests.test_train import _random_latents

ROOT = Path(__file__).resolve().parents[1]

#: The training script both runs launch. accelerate 1.15 assigns ``DistributedType.FSDP`` only in its GPU branch
#: (``AcceleratorState.__init__``: the MULTI_GPU/MLU/NPU/... case reads ACCELERATE_USE_FSDP; MULTI_CPU never does), so
#: on CPU it would silently run DDP; torch 2.13's ``fully_shard`` itself runs on CPU with gloo. With ``FSDP_ON_CPU``
#: the script switches accelerate's state to FSDP after its own init, and nothing else.
_SCRIPT = """
import os
import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from pickstyle import checkpoints as ckpt
from pickstyle import flow_matching as fm
from pickstyle import train as tr
from pickstyle.data import stream
from pickstyle.config import parse_params

if os.environ.get("FSDP_ON_CPU") == "1":
    _init = AcceleratorState.__init__

    def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = _init_fsdp_on_cpu

import pickstyle.model.trainable as trainable
_empty = trainable.empty_transformer

def say(line):
    # one write per line: both ranks print to one unbuffered pipe, and print() writes its pieces one by one
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

def spy(*args):
    say(f"EMPTY MODEL ON RANK {os.environ['RANK']}")
    return _empty(*args)

trainable.empty_transformer = spy
torch.set_num_threads(1)
root, models, steps, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
params = parse_params({
    "paths": {"data": f"{root}/data", "models": models},
    "model": {"dtype": dtype},
    "train": {
        "steps": steps, "checkpoint_every": 2, "mlflow": False, "lr": 1e-3, "warmup_steps": 0, "device": "cpu",
        "gradient_checkpointing": True, "lr_schedule": "constant", "adapters": "joint",
    },
})
summary = tr.train(params)
say(f"TRAINED {AcceleratorState().distributed_type} {summary['start_step']} {summary['steps']}")
"""


def _port() -> str:
    with socket.socket() as sock:  # a free port: other test sessions may share the machine
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(root: Path, models: Path, steps: int, dtype: str, fsdp: bool) -> str:
    """Two CPU processes: FSDP through ``accelerate launch`` with the project's FSDP config, DDP through torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    script = [str(root / "train_script.py"), str(root), str(models), str(steps), dtype]
    if fsdp:
        env["FSDP_ON_CPU"] = "1"
        launcher = [
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs/accelerate/fsdp-14b.yaml"),
        ]
        launcher += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", _port()]
    else:
        launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        launcher += ["--master_port", _port()]
    proc = run_group([sys.executable, "-m", *launcher, *script], timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_fsdp_two_processes_checkpoint_resume_and_adapter_equal_to_ddp(tmp_path: Path, tiny_backbone: Path):
    dtype = "bfloat16"  # the real profiles': a bf16 base and fp32 LoRA in one FSDP unit
    _random_latents(tmp_path / "data", n=8, shard_size=2)
    (tmp_path / "train_script.py").write_text(textwrap.dedent(_SCRIPT))
    runs = {}
    for name in ("ddp", "fsdp"):
        runs[name] = tmp_path / name
        shutil.copytree(tiny_backbone.parent, runs[name])

    # The reference: DDP, 4 steps uninterrupted. FSDP: 2 steps (a checkpoint at 2), then resumed to 4.
    out = _launch(tmp_path, runs["ddp"], 4, dtype, fsdp=False)
    assert "TRAINED DistributedType.MULTI_CPU 0 4" in out
    out = _launch(tmp_path, runs["fsdp"], 2, dtype, fsdp=True)
    assert "TRAINED DistributedType.FSDP 0 2" in out
    # RAM-efficient loading: only rank 0 read the weights.
    assert "EMPTY MODEL ON RANK 1" in out and "EMPTY MODEL ON RANK 0" not in out

    last = ckpt.list_checkpoints(runs["fsdp"] / ".checkpoints" / "adapter")[-1]
    ref = load_file(runs["ddp"] / "adapter" / "pytorch_lora_weights.safetensors")
    lora = load_file(last / "lora.safetensors")
    # The checkpoint holds the whole LoRA tensors and nothing of the frozen backbone.
    assert lora and all(".lora_" in k for k in lora)
    assert sorted(v.shape for v in lora.values()) == sorted(v.shape for v in ref.values())
    assert {p.name for p in last.glob("optimizer*")} == {"optimizer-rank-0.pt", "optimizer-rank-1.pt"}
    # Each rank's optimizer file holds its own shard of Adam's moments: the two halves make the whole.
    shards = [torch.load(last / f"optimizer-rank-{r}.pt", weights_only=True) for r in (0, 1)]
    full = sorted(v.shape[0] for v in lora.values())
    r0, r1 = (list(s["state"].values()) for s in shards)
    rows = sorted(a["exp_avg"].shape[0] + b["exp_avg"].shape[0] for a, b in zip(r0, r1, strict=True))
    assert rows == full

    out = _launch(tmp_path, runs["fsdp"], 4, dtype, fsdp=True)
    assert "TRAINED DistributedType.FSDP 2 4" in out  # resumed from step 2
    adapter = load_file(runs["fsdp"] / "adapter" / "pytorch_lora_weights.safetensors")
    assert adapter.keys() == ref.keys()
    for k in ref:  # gathered whole tensors (not shards), equal to the un-sharded run's
        assert adapter[k].shape == ref[k].shape
        torch.testing.assert_close(adapter[k], ref[k], rtol=1e-5, atol=1e-6)
    assert any(ref[k].abs().sum() > 0 for k in ref if ".lora_B." in k)


def test_empty_transformer_matches_from_pretrained(tiny_backbone: Path):
    from diffusers import WanVACETransformer3DModel

    loaded = WanVACETransformer3DModel.from_pretrained(tiny_backbone / "transformer", dtype=torch.bfloat16)
    empty = empty_transformer(tiny_backbone, torch.bfloat16)
    a, b = dict(loaded.named_parameters()), dict(empty.named_parameters())
    assert a.keys() == b.keys()
    assert all(b[k].is_meta and b[k].dtype == a[k].dtype and b[k].shape == a[k].shape for k in a)
    assert {a[k].dtype for k in a} == {torch.bfloat16, torch.float32}  # the fp32-kept modules stay fp32
    buffers = dict(empty.named_buffers())
    assert all(torch.equal(buffers[k], v) and buffers[k].dtype == v.dtype for k, v in loaded.named_buffers())


def test_local_optimizer_state_round_trips_without_sharding():
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([param], lr=1e-2)
    param.grad = torch.randn(4, 3)
    opt.step()
    saved = ckpt._local_optimizer_state(opt)
    fresh = torch.optim.AdamW([param], lr=1e-2)
    fresh.load_state_dict(ckpt._sharded_optimizer_state(fresh, saved))
    for k, v in opt.state[param].items():
        assert torch.equal(fresh.state[param][k], v)
