"""The frozen backbone: a tiny Wan2.1-VACE built offline, or a local diffusers-format Wan2.1-VACE folder.

Every later stage loads the backbone the same way (:func:`load_pipeline` on a diffusers folder), so the tiny
profile exercises exactly the code path of the real 1.3B/14B weights. The tiny folder has the real classes at small
sizes (:func:`init_tiny_pipeline`): transformer, VAE (fewer latent channels, lighter compression than Wan's), UMT5
encoder, an in-process tokenizer and Wan's flow-matching UniPC scheduler; :mod:`pickstyle.pretrain` trains it from
scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel
from diffusers.configuration_utils import FrozenDict
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from pickstyle.config import Params, TinyBackbone
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_dir, resolve_device, write_json
from pickstyle.model import latent_space

#: The tiny backbone is "pretrained weights": its seed is fixed, not ``params.seed`` (a training knob).
TINY_SEED = 0
#: Marker written next to (tiny) or for (real) the backbone; DVC tracks it.
MARKER = "pickstyle_backbone.json"
#: Wan's text length at inference (``WanVACEPipeline.__call__`` default; the original code's ``text_len``).
REAL_TEXT_TOKENS = 512

#: Files a diffusers-format Wan2.1-VACE folder must hold. Weight files may be single or sharded (index json).
_REQUIRED_CONFIGS = [
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
]
_WEIGHT_DIRS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}

#: Whole-word tokens of the tiny tokenizer (anything else falls back to byte-level pieces, never to <unk>).
_WORDS = """
a an the and or of in on at to with from by for as is are was be this that it its into over under near
style reconstruct real video clip photo image picture scene frame camera motion moving static slow fast
anime sketch sepia pixel watercolor cartoon pixar clay lego origami vector chibi 3d rick morty macaron
oil painting comic ink pencil pastel neon noir vintage retro flat cel shaded render drawing
man woman person people child boy girl dog cat bird horse wolf animal animals face hand hands eye eyes
tree trees forest grass flower flowers field mountain mountains hill river lake sea ocean beach sky cloud
clouds sun moon night day light dark shadow snow rain fog water rock rocks stone sand road street city
building buildings house room wall window door car bus train boat bike table chair cup food fruit
red green blue yellow orange purple pink black white gray grey brown gold silver colorful bright
big small large tiny old young new long short tall round soft hard smooth rough wet dry warm cold
walking running standing sitting looking flying swimming jumping dancing playing holding wearing
left right up down zoom slide rotate pan tilt close view background foreground top bottom middle
astronaut coffee rocket moon cells microscope coins chelsea camera hubble text
""".split()


class BackboneError(PickstyleError):
    """The backbone folder is missing or incomplete; the message lists every missing file."""


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tokenizer(max_text_tokens: int = 32):
    """A T5-like tokenizer made in-process: whole words from a fixed list, byte-level pieces for the rest.

    Unigram over the 256 byte-level symbols plus ``_WORDS``: any string (Chinese included) tokenizes without
    ``<unk>``, known words become one token, and ``</s>`` ends every sequence like T5/UMT5.

    Returns:
        A ``transformers`` fast tokenizer with ``<pad>`` (id 0), ``</s>`` (id 1) and ``<unk>`` (id 2).
    """

    specials = ["<pad>", "</s>", "<unk>"]
    vocab: list[tuple[str, float]] = [(s, 0.0) for s in specials]
    vocab += [(c, -10.0) for c in sorted(pre_tokenizers.ByteLevel.alphabet())]
    seen = {v for v, _ in vocab}
    for word in dict.fromkeys(_WORDS):  # ordered de-dup keeps ids stable
        piece = "\u0120" + word  # ByteLevel marks a leading space with "Ġ"
        if piece not in seen:
            vocab.append((piece, -2.0))
            seen.add(piece)
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_text_tokens,
        padding_side="right",
    )


def tiny_transformer_config(tiny: TinyBackbone) -> dict[str, Any]:
    """``WanVACETransformer3DModel`` kwargs of the tiny profile (the real ones: :func:`real_config`)."""
    return {
        "patch_size": tuple(tiny.patch_size),
        "num_attention_heads": tiny.num_attention_heads,
        "attention_head_dim": tiny.attention_head_dim,
        "in_channels": tiny.vae_z_dim,
        "out_channels": tiny.vae_z_dim,
        "text_dim": tiny.text_dim,
        "freq_dim": tiny.freq_dim,
        "ffn_dim": tiny.ffn_dim,
        "num_layers": tiny.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
        "vace_layers": list(tiny.vace_layers),
        # inactive + reactive latents (z + z) + the mask folded to (VAE spatial factor)^2 channels (Wan: 16+16+64)
        "vace_in_channels": 2 * tiny.vae_z_dim + tiny.vae_scale_spatial**2,
    }


def tiny_latent_geometry(
    tiny: TinyBackbone, frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """``(context channels, latent frames, latent height, latent width)`` of a clip on the tiny backbone."""
    s, t = tiny.vae_scale_spatial, tiny.vae_scale_temporal
    return 2 * tiny.vae_z_dim + s * s, (frames - 1) // t + 1, height // s, width // s


def tiny_vae_config(tiny: TinyBackbone) -> dict[str, Any]:
    """``AutoencoderKLWan`` kwargs of the tiny profile: fewer latent channels and lighter compression than Wan's
    (see TinyBackbone); the latent statistics start neutral and are measured (:func:`calibrate_vae`)."""
    return {
        "base_dim": tiny.vae_base_dim,
        "decoder_base_dim": tiny.vae_decoder_base_dim or tiny.vae_base_dim,
        "z_dim": tiny.vae_z_dim,
        "latents_mean": [0.0] * tiny.vae_z_dim,
        "latents_std": [1.0] * tiny.vae_z_dim,
        "dim_mult": list(tiny.vae_dim_mult),
        "num_res_blocks": 1,
        "temperal_downsample": list(tiny.vae_temporal_downsample),
        "scale_factor_spatial": tiny.vae_scale_spatial,
        "scale_factor_temporal": tiny.vae_scale_temporal,
    }


def tiny_text_config(tiny: TinyBackbone, vocab_size: int):
    """The tiny UMT5 encoder's config."""

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=tiny.text_dim,
        d_kv=tiny.text_dim // tiny.text_heads,
        d_ff=tiny.text_ffn_dim,
        num_layers=tiny.text_layers,
        num_heads=tiny.text_heads,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def real_config(name: str) -> dict[str, Any]:
    """The transformer config of Wan2.1-VACE 1.3B or 14B (docs/method.md §2), for random-init benchmarks.

    Args:
        name: ``wan-1.3b`` or ``wan-14b``.
    """
    common = {
        "patch_size": (1, 2, 2),
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
        "vace_in_channels": 96,
    }
    if name == "wan-1.3b":
        return {
            **common,
            "num_attention_heads": 12,
            "ffn_dim": 8960,
            "num_layers": 30,
            "vace_layers": list(range(0, 30, 2)),
        }
    if name == "wan-14b":
        return {
            **common,
            "num_attention_heads": 40,
            "ffn_dim": 13824,
            "num_layers": 40,
            "vace_layers": list(range(0, 40, 5)),
        }
    raise ValueError(f"unknown backbone {name!r}: expected wan-1.3b or wan-14b")


def _scheduler():
    """Wan2.1's scheduler config (UniPC in flow-matching mode; the sampler may swap it at inference)."""

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def calibrate_vae(vae, videos: torch.Tensor) -> None:
    """Set the VAE's ``latents_mean``/``latents_std`` (one entry per latent channel) to its own latent statistics
    on ``videos``.

    Wan's published statistics belong to Wan's VAE; any other VAE needs its own, or the normalised latents the
    transformer sees are not unit-scale.

    Args:
        vae: An ``AutoencoderKLWan``.
        videos: ``[b, 3, f, h, w]`` in [-1, 1].
    """
    with torch.no_grad():
        z = latent_space.vae_encode(vae, videos).mode().float()  # [b, z, f', h', w']
    mean = [round(float(v), 5) for v in z.mean(dim=(0, 2, 3, 4))]
    std = [round(max(float(v), 1e-3), 5) for v in z.std(dim=(0, 2, 3, 4))]
    vae.register_to_config(latents_mean=mean, latents_std=std)


def _calibration_video() -> torch.Tensor:
    """A fixed synthetic video (smooth random fields plus fine noise, in [-1, 1]) for a random VAE's statistics."""
    gen = torch.Generator().manual_seed(1234)
    coarse = torch.rand(2, 3, 3, 4, 6, generator=gen) * 2 - 1  # [b, c, f, h, w]
    video = torch.nn.functional.interpolate(coarse, size=(9, 64, 96), mode="trilinear", align_corners=True)
    return (0.8 * video + 0.2 * (torch.rand(video.shape, generator=gen) * 2 - 1)).clamp(-1, 1)


def init_tiny_pipeline(tiny: TinyBackbone, seed: int = TINY_SEED):
    """A randomly initialised tiny ``WanVACEPipeline`` (the ``pretrain`` stage's starting point; tests' fixture).

    The same ``tiny`` sizes and ``seed`` give identical weights (each component draws from its own seed).
    """

    tokenizer = build_tokenizer(tiny.max_text_tokens)
    with _seeded(seed):
        transformer = WanVACETransformer3DModel(**tiny_transformer_config(tiny))
    with _seeded(seed + 1):
        vae = AutoencoderKLWan(**tiny_vae_config(tiny))
        latent_space.set_framewise(vae, tiny.vae_framewise)
        calibrate_vae(vae, _calibration_video())
    with _seeded(seed + 2):
        text_encoder = UMT5EncoderModel(tiny_text_config(tiny, len(tokenizer))).eval()
    return WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_scheduler(),
        transformer=transformer,
    )


def save_backbone(
    pipe,
    out_dir: str | Path,
    marker: dict[str, Any] | None = None,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Save a pipeline as a diffusers folder, atomically (the folder appears whole or not at all).

    Args:
        pipe: The pipeline.
        out_dir: The folder (replaced as a whole).
        marker: Written as ``pickstyle_backbone.json`` in the folder.
        extras: Called with the temporary folder to add files (e.g. training curves) before it is renamed.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the folder is shared like any model folder
        pipe.save_pretrained(tmp, safe_serialization=True)
        if marker is not None:
            write_json(tmp / MARKER, marker)
        if extras is not None:
            extras(tmp)
    return out_dir


def build_tiny_backbone(
    out_dir: str | Path, tiny: TinyBackbone, seed: int = TINY_SEED, marker: dict[str, Any] | None = None
) -> Path:
    """Save a *randomly initialised* tiny backbone (tests and benchmarks that need no learned weights).

    The embedded default's backbone is the pretrained one (:mod:`pickstyle.pretrain`).
    """
    return save_backbone(init_tiny_pipeline(tiny, seed), out_dir, marker)


def backbone_path(params: Params) -> Path:
    """Where the backbone's diffusers folder is: ``<models>/backbone`` (tiny) or ``model.path`` (real)."""
    if params.active.backbone == "tiny":
        return Path(params.paths.models) / "backbone"
    if not params.model.path:
        raise BackboneError(
            f"profile {params.profile!r} needs a local diffusers-format Wan2.1-VACE folder: set model.path "
            "(e.g. -S model.path=/models/Wan2.1-VACE-1.3B-diffusers)"
        )
    return Path(params.model.path)


def backbone_fingerprint(path: str | Path, sample: int = 1 << 20) -> str:
    """The backbone's identity, the one every stage uses (latent cache, training checkpoints, the registry).

    sha256 over each file's relative path and, for configs and tokenizer files, its bytes; for weight files their
    size and first and last MiB. Cheap on a 30 GB folder, stable across copies, and a retrained tiny backbone
    (same sizes, new weights) gets a new identity.
    """
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode())
        size = p.stat().st_size
        with open(p, "rb") as f:
            if p.suffix in (".json", ".txt", ".model") or size <= 2 * sample:
                h.update(f.read())
            else:
                h.update(str(size).encode())
                h.update(f.read(sample))
                f.seek(size - sample)
                h.update(f.read(sample))
    return h.hexdigest()


def _weight_present(folder: Path, stem: str) -> bool:
    return any(
        (folder / f"{stem}{suffix}").is_file()
        for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
    )


def missing_files(path: str | Path) -> list[str]:
    """The files a diffusers-format Wan2.1-VACE folder lacks (relative names; empty when complete)."""
    path = Path(path)
    missing = [name for name in _REQUIRED_CONFIGS if not (path / name).is_file()]
    for sub, stem in _WEIGHT_DIRS.items():
        if not _weight_present(path / sub, stem):
            missing.append(f"{sub}/{stem}.safetensors")
        index = path / sub / f"{stem}.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: every shard it names must exist
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                missing.append(f"{sub}/{index.name} (unreadable)")
                shards = []
            missing += [f"{sub}/{s}" for s in shards if not (path / sub / s).is_file()]
    tok = path / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
        missing.append("tokenizer/tokenizer.json (or spiece.model)")
    if not (tok / "tokenizer_config.json").is_file():
        missing.append("tokenizer/tokenizer_config.json")
    return missing


def check_tiny_backbone(path: str | Path, tiny: TinyBackbone) -> None:
    """Raise :class:`BackboneError` unless ``path`` holds a pretrained tiny backbone of the ``tiny`` sizes."""
    path = Path(path)
    missing = missing_files(path)
    if missing:
        where = "" if path.is_absolute() else f" (paths are relative to the working directory, {Path.cwd()})"
        if not path.exists():
            what = f"{path}: no such folder{where}"
        else:
            what = f"{path}: no pretrained tiny backbone (missing: {', '.join(missing)})"
        raise BackboneError(
            f"{what}; it is committed with the repository (run from its root, or set paths.models), or made by "
            "`dvc repro pretrain` (README: The tiny backbone)"
        )
    want = tiny_transformer_config(tiny)
    have = json.loads((path / "transformer" / "config.json").read_text())
    diff = [k for k, v in want.items() if json.loads(json.dumps(v)) != have.get(k)]
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    if bool(vae_config.get(latent_space.FRAMEWISE_KEY, False)) != tiny.vae_framewise:
        diff.append("vae_framewise")
    if diff:
        raise BackboneError(
            f"{path}: the tiny backbone was pretrained with other sizes than params model.tiny "
            f"(differs in {', '.join(diff)}); run `dvc repro pretrain` to pretrain one of these sizes"
        )


def ensure_backbone(params: Params) -> Path:
    """Check the backbone is available and return its diffusers folder.

    tiny: the pretrained folder ``<models>/backbone`` (made by the ``pretrain`` stage, committed with the
    repository) must be there with the sizes of ``model.tiny``. Real profiles: check ``model.path`` is complete
    (raising :class:`BackboneError` with every missing file).
    """
    path = backbone_path(params)
    if params.active.backbone == "tiny":
        check_tiny_backbone(path, params.model.tiny)
        return path
    if not path.is_dir():
        raise BackboneError(
            f"{path}: model.path is not a folder (expected a diffusers-format Wan2.1-VACE folder)"
        )
    missing = missing_files(path)
    if missing:
        raise BackboneError(
            f"{path}: incomplete diffusers-format Wan2.1-VACE folder; missing: " + ", ".join(missing)
        )
    return path


def prompt_length(pipe) -> int:
    """Tokens every prompt embedding is padded to; training, latents and sampling must agree.

    The tokenizer's ``model_max_length`` (the tiny one: ``max_text_tokens``), capped at Wan's 512 (a real UMT5
    tokenizer may report a huge "no limit" value). Wan cross-attends over the zero padding too, so a different
    length changes the model's output.
    """
    return min(
        int(getattr(pipe.tokenizer, "model_max_length", REAL_TEXT_TOKENS) or REAL_TEXT_TOKENS),
        REAL_TEXT_TOKENS,
    )


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bf16 on CUDA, fp32 elsewhere; names such as ``"float32"`` -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


class TransformerSpec:
    """The transformer as the pipeline's preprocessing sees it, without its weights: the config of
    ``transformer/config.json`` and the dtype it would be loaded in.

    Stands in for ``pipe.transformer`` where only the VAE and the text encoder run (the ``latents`` stage; 28 GB of
    bf16 weights on 14B not read): ``preprocess_conditions`` and ``prepare_masks`` read ``config.patch_size``,
    :func:`pickstyle.latents.encode_clip` also ``dtype``.
    """

    def __init__(self, config: dict[str, Any], dtype: torch.dtype) -> None:

        self.config = FrozenDict(config)
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"TransformerSpec({self.config.get('_class_name')}, {self.dtype}, no weights)"


def load_pipeline(
    path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    pipeline_cls=None,
    transformer: bool = True,
):
    """Load a diffusers-format Wan2.1-VACE folder (tiny or real) onto ``device``.

    The VAE stays fp32 even when the rest is bf16 (as Wan's diffusers examples do: its decoder is sensitive).

    Args:
        path: The folder (:func:`backbone_path`).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        dtype: ``None``/``"auto"`` = bf16 on CUDA, fp32 on CPU; or a torch dtype / its name.
        pipeline_cls: Pipeline class to instantiate (default ``WanVACEPipeline``; the sampler passes its subclass).
        transformer: ``False``: do not load the transformer; ``pipe.transformer`` is a :class:`TransformerSpec`
            (its config and dtype), enough to encode clips and prompts, not to denoise.
    """

    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise BackboneError(
            f"{path}: incomplete diffusers-format Wan2.1-VACE folder; missing: " + ", ".join(missing)
        )
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    cls = pipeline_cls or WanVACEPipeline
    vae = AutoencoderKLWan.from_pretrained(path / "vae", dtype=torch.float32)
    skip = {} if transformer else {"transformer": None}
    pipe = cls.from_pretrained(path, vae=vae, dtype=torch_dtype, **skip)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if not transformer:
        # Into __dict__, not through the pipeline's setattr: its config keeps saying that no transformer is loaded.
        config = json.loads((path / "transformer" / "config.json").read_text())
        pipe.__dict__["transformer"] = TransformerSpec(config, torch_dtype)
    return pipe


def offload_text_encoder(pipe, offload: bool | None = None):
    """Encode each prompt once and keep the text encoder off the accelerator in between.

    Wraps ``pipe.encode_prompt``: results are kept per arguments (stylize encodes the same prompt and negative
    prompt for every window), and with ``offload`` the text encoder goes to the CPU after each encoding and back
    to the execution device for a new one. On CUDA this frees UMT5-XXL's ~11 GB (bf16) for the transformer's
    activations once the prompts are encoded; the pipeline still computes on CUDA (``pipe.device`` prefers a
    non-CPU component). Given embeddings bypass the cache.

    Args:
        pipe: A ``WanVACEPipeline`` (or subclass), modified in place.
        offload: Move the text encoder to the CPU after encoding; ``None`` = when it is on CUDA (on the CPU there
            is nothing to free).

    Returns:
        ``pipe``.
    """
    encode = pipe.encode_prompt
    if offload is None:
        offload = pipe.text_encoder.device.type == "cuda"
    cache: dict[tuple, tuple] = {}

    def encode_prompt(prompt, negative_prompt=None, *args, **kwargs):
        given = kwargs.get("prompt_embeds") is not None or kwargs.get("negative_prompt_embeds") is not None
        key = (repr(prompt), repr(negative_prompt), repr(args), repr(sorted(kwargs.items())))
        if given or key not in cache:
            device = kwargs.get("device") or pipe._execution_device
            if offload:
                pipe.text_encoder.to(device)
            result = encode(prompt, negative_prompt, *args, **kwargs)
            if offload:
                pipe.text_encoder.to("cpu")
            if given:
                return result
            cache[key] = result
        return cache[key]

    pipe.encode_prompt = encode_prompt
    return pipe
