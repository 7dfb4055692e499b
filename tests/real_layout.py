"""A folder in the exact layout of the public ``Wan-AI/Wan2.1-VACE-{1.3B,14B}-diffusers`` repositories, at tiny sizes.

What the real folders hold, and what this copies: ``model_index.json`` with the published class names;
``transformer/``, ``vae/`` and ``text_encoder/`` as *sharded* safetensors with an index json (the real ones are
5-14 shards), weights stored in bf16 (the VAE in fp32, as published); ``tokenizer/`` files of a T5 fast tokenizer
whose ``tokenizer_config.json`` has no ``model_max_length`` (so transformers reports its "no limit" value and the
pipeline must cap prompts at Wan's 512 tokens itself); ``scheduler/scheduler_config.json`` with the published
values. Sizes are tiny but the *structure* is the real one: 8x spatial / 4x temporal VAE, patch (1, 2, 2),
96-channel VACE context, VACE blocks every 2nd layer (1.3B) or every 5th (14B).

Nothing is downloaded: the tokenizer is a Unigram model made here (``tokenizers``), wrapped in ``T5TokenizerFast``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: ``model_index.json`` of Wan-AI/Wan2.1-VACE-1.3B-diffusers (and -14B): the published class names.
MODEL_INDEX = {
    "_class_name": "WanVACEPipeline",
    "_diffusers_version": "0.34.0.dev0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanVACETransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}

#: ``scheduler/scheduler_config.json`` as published with Wan2.1 (flow-matching UniPC, shift 3).
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.34.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

#: Wan's published VAE latent statistics (``vae/config.json``), kept so the normalisation path is the real one.
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

#: Tiny stand-ins for the two public sizes: same layer pattern (VACE every 2nd / 5th layer), small widths.
TINY_REAL = {
    "wan-1.3b": {"num_layers": 4, "vace_layers": [0, 2]},
    "wan-14b": {"num_layers": 5, "vace_layers": [0]},
}
TEXT_DIM = 32

_WORDS = (
    "a the of in on and style reconstruct real video clip anime sketch sepia pixel watercolor photo".split()
)


def build_t5_tokenizer():
    """A ``T5TokenizerFast`` over a tiny Unigram vocabulary (single characters + a few words), made offline.

    SentencePiece conventions as UMT5's ``tokenizer.json``: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, words
    marked by a leading ``▁`` (Metaspace), ``</s>`` appended to every sequence. (transformers 5 rebuilds a T5
    tokenizer's pre-tokenizer as Metaspace on load, so the vocabulary must use it.)
    """
    import string

    from tokenizers import Tokenizer, models, processors
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + w, -2.0) for w in dict.fromkeys(_WORDS)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def transformer_config(name: str) -> dict[str, Any]:
    """``WanVACETransformer3DModel`` kwargs: the real structure (patch, channels, norms) at tiny widths."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": TEXT_DIM,
        "freq_dim": 16,
        "ffn_dim": 32,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
        "vace_in_channels": 96,
        **TINY_REAL[name],
    }


def vae_config() -> dict[str, Any]:
    """``AutoencoderKLWan`` kwargs: Wan's 8x spatial / 4x temporal structure, base_dim 8 instead of 96."""
    return {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": LATENTS_MEAN,
        "latents_std": LATENTS_STD,
    }


def _shard_size(module: torch.nn.Module, shards: int = 3) -> int:
    """A ``max_shard_size`` in bytes that splits ``module``'s weights into about ``shards`` files."""
    total = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    return max(total // shards, 1)


def write_real_layout(out: str | Path, name: str = "wan-1.3b", seed: int = 0) -> Path:
    """Write a tiny random Wan2.1-VACE diffusers folder in the public layout into ``out``.

    Args:
        out: The folder to create.
        name: ``wan-1.3b`` or ``wan-14b`` (which layer pattern).
        seed: Weight seed.

    Returns:
        ``out``.
    """
    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    tokenizer = build_t5_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    config_path = out / "tokenizer" / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("model_max_length", None)  # as published: no limit recorded, Wan's 512 is the pipeline's
    config_path.write_text(json.dumps(tok_config, indent=2))

    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(**transformer_config(name)).to(torch.bfloat16)
    transformer.save_pretrained(out / "transformer", max_shard_size=_shard_size(transformer))
    vae = AutoencoderKLWan(**vae_config())  # published in fp32
    vae.save_pretrained(out / "vae", max_shard_size=_shard_size(vae, 2))
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    text_encoder = UMT5EncoderModel(text_config).to(torch.bfloat16).eval()
    text_encoder.save_pretrained(out / "text_encoder", max_shard_size=_shard_size(text_encoder, 2))
    return out
