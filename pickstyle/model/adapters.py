"""Context-style adapters: LoRA on the self-attention q/k/v of the VACE context blocks only (PickStyle §3).

A LoRA layer computes ``W0 x + (alpha / r) B A x`` (``B`` starts at zero, so a new adapter leaves the backbone's
output unchanged). Adapters are saved in diffusers' LoRA format *with* the peft config as metadata: without it
``load_lora_weights`` would silently reset alpha to r (docs/method.md §3).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanVACEPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_dir, write_json

#: peft fullmatches a *string* target: only the VACE context blocks' self-attention q/k/v (a list of suffixes
#: would also hit the main blocks' ``attn1``).
CONTEXT_STYLE_TARGETS = r"vace_blocks\.\d+\.attn1\.to_(?:q|k|v)"
#: Weight file written by ``save_lora_weights`` (diffusers' default name).
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Our own description of the adapter (rank, alpha, targets, provenance), beside the weights.
INFO_NAME = "pickstyle_adapter.json"
#: The index of a per-style adapter folder (``train.adapters: per_style``): ``{"styles": {style: {"dir": ...,
#: "names": [...]}}}``; each style's adapter is an ordinary adapter folder beneath it, ``<dir>/``.
STYLES_NAME = "pickstyle_styles.json"
#: The adapter name of a joint (one-for-every-style) adapter in the pipeline.
JOINT_NAME = "pickstyle"

#: Official PickStyle key: ``[module.]vace_blocks.N.self_attn.{q,k,v}.lora_{A,B}[.<adapter>].weight``.
_OFFICIAL_KEY = re.compile(
    r"^(?:module\.)?vace_blocks\.(?P<block>\d+)\.self_attn\.(?P<proj>[qkv])\.lora_(?P<ab>[AB])"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)


class AdapterError(PickstyleError):
    """An adapter folder or checkpoint is missing, malformed or holds unexpected keys."""


def add_context_style_adapter(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: bool | str = True,
    targets: str = CONTEXT_STYLE_TARGETS,
    adapter_name: str = "default",
) -> torch.nn.Module:
    """Add a trainable context-style LoRA to a ``WanVACETransformer3DModel`` and freeze everything else.

    LoRA parameters are kept in fp32 (the backbone may be bf16): peft casts activations to the LoRA dtype, so
    updates accumulate in full precision, as the reference trains.

    Args:
        transformer: The backbone transformer (modified in place).
        rank: LoRA rank r.
        alpha: LoRA alpha (scale alpha / r).
        dropout: LoRA dropout on the adapter input.
        init: peft ``init_lora_weights`` (True = B zero so the output is unchanged, or ``"gaussian"``, ...).
        targets: Module-name regex, fullmatched by peft.
        adapter_name: peft adapter name.

    Returns:
        ``transformer``.
    """

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=init,
        target_modules=targets,
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    hit = [n for n, _ in transformer.named_modules() if re.fullmatch(targets, n)]
    if not hit:
        raise AdapterError(f"LoRA targets {targets!r} match no module of {type(transformer).__name__}")
    for name, param in transformer.named_parameters():
        is_lora = ".lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            param.data = param.data.float()
    return transformer


def lora_parameter_count(transformer: torch.nn.Module) -> int:
    """Number of LoRA parameters (all adapters) in ``transformer``."""
    return sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" in n)


def _transformer_of(pipeline_or_transformer: Any) -> torch.nn.Module:
    transformer = getattr(pipeline_or_transformer, "transformer", None)
    return pipeline_or_transformer if transformer is None else transformer


def _single_adapter(transformer: torch.nn.Module, adapter_name: str | None) -> str:
    names = list(getattr(transformer, "peft_config", {}) or {})
    if adapter_name is not None:
        if adapter_name not in names:
            raise AdapterError(f"adapter {adapter_name!r} not found (the transformer has {names})")
        return adapter_name
    if len(names) != 1:
        raise AdapterError(
            f"expected exactly one adapter on the transformer, found {names}: pass adapter_name"
        )
    return names[0]


def save_adapter(
    pipeline_or_transformer: Any,
    out_dir: str | Path,
    extra_metadata: dict[str, Any] | None = None,
    adapter_name: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the adapter in diffusers' LoRA format with its peft config as metadata (atomically).

    Writes ``pytorch_lora_weights.safetensors`` (keys ``transformer.vace_blocks.N.attn1.to_q.lora_A.weight``,
    metadata = the ``LoraConfig``, so alpha survives ``load_lora_weights``) and ``pickstyle_adapter.json``
    (rank, alpha, targets, parameter count and ``extra_metadata``).

    Args:
        pipeline_or_transformer: A pipeline (its ``.transformer`` is used) or the transformer itself.
        out_dir: Folder to write (replaced as a whole).
        extra_metadata: JSON-serialisable provenance (steps, params hash, ...) for ``pickstyle_adapter.json``.
        adapter_name: Which adapter, when the transformer holds several.
        state_dict: The transformer's LoRA tensors by parameter name (``...lora_A.<adapter>.weight``) to write
            instead of its own parameters: the gathered whole tensors when the live ones are FSDP shards.

    Returns:
        ``out_dir``.
    """

    transformer = _transformer_of(pipeline_or_transformer)
    name = _single_adapter(transformer, adapter_name)
    config = transformer.peft_config[name]
    state = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=name)
    # Contiguous CPU copies: safetensors refuses views, and the caller may keep training the live tensors.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    return _write_adapter(out_dir, state, config, extra_metadata)


def _write_adapter(
    out_dir: str | Path, state: dict[str, torch.Tensor], config: Any, extra: dict[str, Any] | None
) -> Path:
    """Write ``state`` (diffusers LoRA keys) with ``config`` (a ``LoraConfig``) as its safetensors metadata, plus
    ``pickstyle_adapter.json``; the folder is replaced as a whole, atomically."""

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)
        WanVACEPipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=state,
            weight_name=WEIGHT_NAME,
            transformer_lora_adapter_metadata=config.to_dict(),  # without it alpha silently becomes r on load
        )
        _sort_safetensors_metadata(tmp / WEIGHT_NAME)
        targets = config.target_modules
        info = {
            "format": "diffusers-lora",
            "weight_name": WEIGHT_NAME,
            "rank": int(config.r),
            "alpha": float(config.lora_alpha),
            "targets": targets if isinstance(targets, str) else sorted(targets),
            "lora_parameters": int(sum(v.numel() for v in state.values())),
            "tensors": len(state),
            **(extra or {}),
        }
        write_json(tmp / INFO_NAME, info)
    return out_dir


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place, so the same weights make the same
    bytes: safetensors writes its metadata map in a per-process random order (two keys here, so two runs of
    ``dvc repro`` recorded different md5s for identical adapters half the time). The header keeps its length
    (the same keys and values, compact JSON, padded with spaces as safetensors pads), so no offset moves."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise AdapterError(f"{path}: its safetensors header cannot be rewritten in place")
        f.seek(8)
        f.write(text.ljust(size, b" "))


def adapter_sha256(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's weights file, which also carries its LoRA config (rank, alpha, targets) as
    safetensors metadata. ``pickstyle_adapter.json`` is left out: it records the run (MLflow run id, final loss),
    so two runs that train the same weights register as one version.

    The file is hashed canonically (header JSON with sorted keys, then the tensor bytes): safetensors writes its
    metadata map in a per-process random order, so the same adapter's raw bytes can differ between two runs.
    """
    weights = Path(adapter_dir) / WEIGHT_NAME
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: no trained adapter (missing {WEIGHT_NAME}; run the train stage)")
    data = weights.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(f"{weights}: not a safetensors file ({err})") from None
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(data[8 + size :])
    return h.hexdigest()


def read_adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """``pickstyle_adapter.json`` of an adapter folder ({} when absent, e.g. a foreign diffusers LoRA)."""
    path = Path(adapter_dir) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_adapter(
    pipe: Any, adapter_dir: str | Path, scale: float = 1.0, adapter_name: str = "pickstyle"
) -> str:
    """Load a saved adapter into ``pipe.transformer`` and activate it with ``scale``.

    Re-loading under the same name replaces the earlier adapter.

    Returns:
        The adapter name.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / WEIGHT_NAME
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: not an adapter folder (missing {WEIGHT_NAME})")
    if adapter_name in (getattr(pipe.transformer, "peft_config", None) or {}):
        pipe.delete_adapters(adapter_name)
    pipe.load_lora_weights(str(adapter_dir), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], [scale])
    return adapter_name


@dataclass(frozen=True)
class AdapterSet:
    """The adapters of a folder: one for every style (``joint``, the paper's) or one per style (``per_style``).

    A per-style folder holds :data:`STYLES_NAME` and one adapter folder per style; :meth:`pick` chooses the
    adapter a prompt asks for by the style it names ("Anime style. a wolf" -> ``anime``). Every adapter loads
    into the same pipeline under its own name; sampling activates one (:meth:`activate`).
    """

    root: Path
    #: style -> its adapter folder; empty for a joint adapter (``root`` itself).
    styles: dict[str, Path]
    #: style -> the words a prompt names it by (the style's name and its caption name, e.g. "pixel art").
    names: dict[str, tuple[str, ...]]

    @classmethod
    def open(cls, folder: str | Path) -> AdapterSet:
        """Read an adapter folder of either layout; raises :class:`AdapterError` naming what is missing."""
        folder = Path(folder)
        index = folder / STYLES_NAME
        if index.is_file():
            try:
                entries = json.loads(index.read_text())["styles"]
            except (ValueError, KeyError, TypeError) as err:
                raise AdapterError(f"{index}: not a per-style adapter index ({err})") from None
            if not entries:
                raise AdapterError(f"{index}: lists no style")
            styles = {style: folder / e["dir"] for style, e in entries.items()}
            for style, path in styles.items():
                if not (path / WEIGHT_NAME).is_file():
                    raise AdapterError(f"{path}: the {style!r} adapter of {index} is missing ({WEIGHT_NAME})")
            names = {
                style: tuple(dict.fromkeys([style, *e.get("names", [])])) for style, e in entries.items()
            }
            return cls(folder, styles, names)
        if not (folder / WEIGHT_NAME).is_file():
            raise AdapterError(f"{folder}: not an adapter folder (no {WEIGHT_NAME}, no {STYLES_NAME})")
        return cls(folder, {}, {})

    @property
    def per_style(self) -> bool:
        return bool(self.styles)

    @property
    def folders(self) -> dict[str, Path]:
        """Adapter name (the style, or :data:`JOINT_NAME`) -> its folder."""
        return dict(self.styles) if self.styles else {JOINT_NAME: self.root}

    def pick(self, prompt: str, style: str | None = None) -> str:
        """The adapter name for ``prompt``: a joint adapter serves every prompt; of per-style adapters, ``style``
        if given, else the only one, else the style the prompt names first (as a whole word, any case).

        Raises:
            AdapterError: ``style`` is not in the folder, or the prompt names none of its styles.
        """
        if not self.styles:
            return JOINT_NAME
        if style is not None:
            if style not in self.styles:
                raise AdapterError(f"{self.root}: no {style!r} adapter (it has {', '.join(self.styles)})")
            return style
        if len(self.styles) == 1:
            return next(iter(self.styles))
        text = prompt.casefold()
        found = [
            (m.start(), -len(word), style)
            for style, words in self.names.items()
            for word in words
            if (m := re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", text))
        ]
        if not found:
            example = self.names[next(iter(self.styles))][-1].capitalize()
            raise AdapterError(
                f"prompt {prompt!r} names none of the styles of {self.root}, which holds one adapter per style: "
                f"{', '.join(self.styles)} (start the prompt with e.g. '{example} style. ...')"
            )
        return min(found)[2]

    def load(self, pipe: Any, scale: float = 1.0, names: list[str] | None = None) -> AdapterSet:
        """Load every adapter (or those of ``names``) into ``pipe.transformer`` under its name; the first one is
        left active."""
        folders = self.folders if names is None else {n: self.folders[n] for n in names}
        with warnings.catch_warnings():  # several adapters in one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            for name, folder in reversed(folders.items()):
                load_adapter(pipe, folder, scale=scale, adapter_name=name)
        return self

    def activate(self, pipe: Any, prompt: str, scale: float, style: str | None = None) -> str:
        """Make the prompt's adapter (:meth:`pick`) the only active one, at ``scale``; returns its name."""
        name = self.pick(prompt, style)
        pipe.set_adapters([name], [scale])
        return name

    def sha256(self) -> str:
        """:func:`adapter_sha256` of a joint adapter; of a per-style folder, a hash over its styles' hashes."""
        if not self.styles:
            return adapter_sha256(self.root)
        h = hashlib.sha256()
        for style in sorted(self.styles):
            h.update(f"{style}:{adapter_sha256(self.styles[style])}\n".encode())
        return h.hexdigest()


def write_styles_index(folder: str | Path, names: dict[str, list[str]]) -> Path:
    """Write a per-style adapter folder's :data:`STYLES_NAME` (style -> the words prompts name it by); each
    style's adapter is ``<folder>/<style>/``."""
    index = Path(folder) / STYLES_NAME
    write_json(index, {"styles": {s: {"dir": s, "names": list(n)} for s, n in sorted(names.items())}})
    return index


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Rename official PickStyle LoRA keys to diffusers' naming; returns (state dict, rank).

    ``[module.]vace_blocks.N.self_attn.q.lora_A.<adapter>.weight`` ->
    ``vace_blocks.N.attn1.to_q.lora_A.weight`` (``save_lora_weights`` then prefixes ``transformer.``).
    Any other key is an error naming it.
    """
    unknown = sorted(k for k in state if not _OFFICIAL_KEY.match(k))
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
        raise AdapterError(
            f"{len(unknown)} unknown key(s) in the checkpoint (not context-style LoRA): {shown}"
        )
    if not state:
        raise AdapterError("the checkpoint holds no tensors")
    out: dict[str, torch.Tensor] = {}
    adapters = set()
    for key, tensor in state.items():
        m = _OFFICIAL_KEY.match(key)
        adapters.add(m["adapter"])
        # No "transformer." prefix: save_lora_weights adds it (as for get_peft_model_state_dict's keys).
        new = f"vace_blocks.{int(m['block'])}.attn1.to_{m['proj']}.lora_{m['ab']}.weight"
        if new in out:
            raise AdapterError(f"key {key} duplicates another key of the same module ({new})")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
            raise AdapterError(f"key {key}: expected a 2-D tensor")
        out[new] = tensor.contiguous()
    if len(adapters) > 1:
        raise AdapterError(
            f"the checkpoint mixes several adapters: {sorted(a or '<none>' for a in adapters)}"
        )
    ranks = {v.shape[0] for k, v in out.items() if ".lora_A." in k} | {
        v.shape[1] for k, v in out.items() if ".lora_B." in k
    }
    if len(ranks) != 1:
        raise AdapterError(f"inconsistent LoRA ranks in the checkpoint: {sorted(ranks)}")
    modules = {k.rsplit(".lora_", 1)[0] for k in out}
    half = [m for m in sorted(modules) if f"{m}.lora_A.weight" not in out or f"{m}.lora_B.weight" not in out]
    if half:
        raise AdapterError(f"modules with only one of lora_A/lora_B: {', '.join(half)}")
    return out, ranks.pop()


def import_official_adapter(
    pth: str | Path, out_dir: str | Path, alpha: float | None = None
) -> dict[str, Any]:
    """Convert an official PickStyle ``.pth`` checkpoint into a diffusers LoRA folder with metadata.

    Args:
        pth: The checkpoint (a state dict, optionally wrapped as ``{"state_dict": ...}``); loaded with
            ``weights_only=True`` so a malicious pickle cannot run code.
        out_dir: Folder to write (as :func:`save_adapter`).
        alpha: LoRA alpha; ``None`` = the rank (the reference trains with alpha = r).

    Returns:
        A summary: out_dir, rank, alpha, modules, blocks, lora_parameters.
    """

    pth = Path(pth)
    if not pth.is_file():
        raise AdapterError(f"{pth}: no such checkpoint")
    try:
        obj = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise AdapterError(f"{pth}: not a loadable torch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterError(f"{pth}: expected a state dict, got {type(obj).__name__}")
    try:
        state, rank = convert_official_state_dict(obj)
    except AdapterError as err:
        raise AdapterError(f"{pth}: {err}") from None
    alpha = float(rank if alpha is None else alpha)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=CONTEXT_STYLE_TARGETS, init_lora_weights=True
    )
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    blocks = sorted({int(k.split(".")[1]) for k in state})
    out_dir = _write_adapter(out_dir, state, config, {"imported_from": str(pth.resolve())})
    n_params = int(sum(v.numel() for v in state.values()))
    return {
        "out_dir": str(out_dir),
        "rank": rank,
        "alpha": alpha,
        "modules": len(modules),
        "blocks": blocks,
        "lora_parameters": n_params,
    }


#: Export formats: the original Wan / PickStyle code's module names (peft inside the original model), and ComfyUI's
#: (the original names under ``diffusion_model.``, with an ``.alpha`` tensor per module, as ComfyUI's LoRA loader
#: reads them).
EXPORT_FORMATS = ("wan", "comfyui")
_DIFFUSERS_KEY = re.compile(
    r"^(?:transformer\.)?vace_blocks\.(?P<block>\d+)\.attn1\.to_(?P<proj>[qkv])\.lora_(?P<ab>[AB])\.weight$"
)


def read_adapter_weights(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """Our adapter folder's tensors (diffusers keys), its rank and alpha (from ``pickstyle_adapter.json``)."""

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / WEIGHT_NAME
    if not weights.is_file() and (adapter_dir / STYLES_NAME).is_file():
        styles = AdapterSet.open(adapter_dir).styles
        raise AdapterError(
            f"{adapter_dir}: one adapter per style ({', '.join(styles)}); name one, e.g. {next(iter(styles.values()))}"
        )
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: not an adapter folder (missing {WEIGHT_NAME})")
    state = load_file(str(weights))
    info = read_adapter_info(adapter_dir)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise AdapterError(f"{weights}: inconsistent or missing LoRA ranks {sorted(ranks)}")
    rank = ranks.pop()
    return state, rank, float(info.get("alpha", rank))


def convert_to_official_state_dict(
    state: dict[str, torch.Tensor], rank: int, alpha: float, fmt: str = "wan"
) -> dict[str, torch.Tensor]:
    """Rename diffusers LoRA keys to the original Wan / PickStyle names or ComfyUI's (the inverse of
    :func:`convert_official_state_dict`).

    ``wan``: ``vace_blocks.N.self_attn.q.lora_A.default.weight``. The reference code runs its adapters at
    alpha = r (scale 1), so a different alpha is folded into ``B`` (B·alpha/r): the same ``W0 + (alpha/r)BA``.
    ``comfyui``: ``diffusion_model.vace_blocks.N.self_attn.q.lora_A.weight`` plus ``...self_attn.q.alpha``
    (ComfyUI scales by alpha / rank itself).
    """
    if fmt not in EXPORT_FORMATS:
        raise AdapterError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _DIFFUSERS_KEY.match(key)
        if m is None:
            raise AdapterError(f"key {key}: not a context-style LoRA tensor (vace_blocks.N.attn1.to_q/k/v)")
        module = f"vace_blocks.{int(m['block'])}.self_attn.{m['proj']}"
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if fmt == "wan":
            if m["ab"] == "B" and alpha != rank:
                tensor = tensor * (alpha / rank)
            out[f"{module}.lora_{m['ab']}.default.weight"] = tensor
        else:
            out[f"diffusion_model.{module}.lora_{m['ab']}.weight"] = tensor
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def export_adapter(adapter_dir: str | Path, out_path: str | Path, fmt: str = "wan") -> dict[str, Any]:
    """Write our adapter in another tool's key naming (see :func:`convert_to_official_state_dict`).

    ``.pth``/``.pt`` files are written with ``torch.save`` (what the PickStyle code loads), anything else as
    safetensors (ComfyUI's ``loras`` folder).

    Returns:
        A summary: path, format, rank, alpha, tensors.
    """

    state, rank, alpha = read_adapter_weights(adapter_dir)
    out = convert_to_official_state_dict(state, rank, alpha, fmt)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    if out_path.suffix in (".pth", ".pt"):
        torch.save(out, tmp)
    else:
        save_file(out, str(tmp), metadata={"format": "pt", "lora_rank": str(rank), "lora_alpha": str(alpha)})
    tmp.replace(out_path)
    return {"path": str(out_path), "format": fmt, "rank": rank, "alpha": alpha, "tensors": len(out)}
