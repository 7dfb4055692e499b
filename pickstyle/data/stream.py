"""The training data stream: deterministic, resumable WebDataset streams of cached latents or clips.

The sample order is a pure function of ``params.seed``, the epoch and the process rank, so a checkpoint needs only
the number of samples each process has consumed (:attr:`MixedStream.position`). Each epoch visits one motion
variant per pair, a different one each epoch (:func:`visits`).
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from pickstyle.errors import PickstyleError

#: Samples held in the shuffle buffer of each process (the tiny dataset fits whole).
SHUFFLE_BUFFER = 256


class StreamError(PickstyleError):
    """The training data yield no sample (of the kind asked for) for a process."""


def is_reconstruction(meta: dict[str, Any]) -> bool:
    """A real-video "reconstruct." clip (its target is its own source), by ``kind`` or caption prefix."""
    return meta.get("kind") == "reconstruct" or str(meta.get("caption", "")).startswith("reconstruct.")


def meta_of(raw: dict[str, Any]) -> dict[str, Any]:
    data = raw.get("json")
    if data is None:
        return {}
    return json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data)


def styles_in(shards: list[Path]) -> dict[str, dict[str, Any]]:
    """The styles of the pair clips in ``shards`` (reconstruction clips have none), by name: the shards holding
    each style's clips and its caption name (the caption's words before " style.", e.g. "Pixel art").

    Reads only the samples' ``.json`` members (tar headers are skipped over, the tensors never read).

    Raises:
        StreamError: A shard that cannot be read.
    """
    found: dict[str, dict[str, Any]] = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    meta = json.loads(tar.extractfile(member).read())
                    style = meta.get("style")
                    if not style or is_reconstruction(meta):
                        continue
                    entry = found.setdefault(str(style), {"shards": [], "names": []})
                    if shard not in entry["shards"]:
                        entry["shards"].append(shard)
                    caption = str(meta.get("caption", ""))
                    name = caption.split(" style.", 1)[0].strip() if " style." in caption else ""
                    if name and name.casefold() not in (n.casefold() for n in entry["names"]):
                        entry["names"].append(name)
        except (OSError, tarfile.TarError, ValueError) as err:
            raise StreamError(f"{shard}: cannot read its samples ({err})") from None
    return dict(sorted(found.items()))


def visits(meta: dict[str, Any], seed: int, epoch: int) -> bool:
    """Whether epoch ``epoch`` visits this clip: one motion variant per pair per epoch, a new one each epoch.

    The clips stage renders K variants of each pair (``variant`` 0..K-1 of ``variants`` K in the meta). Epoch e
    visits variant ``(e + offset) mod K`` of a pair, the offset drawn per pair from the seed, so an epoch is one
    pass over the pairs and K epochs show each pair in K different camera motions (the reference draws a fresh
    motion on every visit). Clips without variants (test, "reconstruct.", old caches) are visited every epoch.
    """
    k = int(meta.get("variants") or 1)
    if k <= 1 or "variant" not in meta:
        return True
    offset = int.from_bytes(hashlib.sha256(f"variant:{seed}:{meta.get('pair_key')}".encode()).digest()[:4])
    return int(meta["variant"]) == (epoch + offset) % k


def distinct_motions(steps: int, samples_per_step: int, pairs: int, variants: int) -> float:
    """Mean number of distinct motion variants each pair is trained on over ``steps`` (reported by ``train``)."""
    if pairs <= 0:
        return 0.0
    visits = steps * samples_per_step / pairs  # epochs
    full, part = int(visits), visits - int(visits)
    return min(variants, full) + (part if full < variants else 0.0)


def motion_report(latents_dir: Path, samples: int) -> dict[str, Any]:
    """Pairs, motion variants and the distinct motions per pair a run of ``samples`` clips shows (from the
    latents stage's summary; empty when it has none)."""
    try:
        summary = json.loads((latents_dir / "summary.json").read_text())
        pairs, variants = int(summary["pairs"]), int(summary["variants"])
    except (OSError, KeyError, ValueError):
        return {}
    return {
        "pairs": pairs,
        "motion_variants": variants,
        "motions_per_pair": round(distinct_motions(samples, 1, pairs, variants), 2),
    }


def sample_stream(
    shards: list[str | Path],
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    skip: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[dict[str, Any]]:
    """Endless stream of one process's raw samples (bytes per extension), the same for the same arguments.

    Epoch ``e`` permutes the shard list with a seed of (``seed``, e), identical on every process; with at least
    as many shards as processes, ``wds.split_by_node`` gives each process its own shards (and
    ``wds.split_by_worker`` each DataLoader worker), otherwise every process reads all shards and keeps every
    ``world_size``-th sample. A seeded shuffle buffer mixes samples across shards. Of a pair rendered in K
    motion variants, each epoch keeps one (:func:`visits`).

    Args:
        shards: The shard files (or ``pipe:`` URLs).
        seed: The run's seed.
        rank: This process's rank; ``world_size`` the number of processes.
        keep: Filter on the decoded ``json`` meta (e.g. pairs only); applied before ``skip``.
        skip: Samples to pass over first (the data position of a checkpoint); they are not decoded.
        shuffle_buffer: Shuffle-buffer size per process.

    Raises:
        StreamError: An epoch yields no sample for this process.
    """
    urls = [str(s) for s in shards]
    by_shard = len(urls) >= world_size
    epoch = 0
    while True:
        order = list(urls)
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        ds = wds.WebDataset(
            order,
            shardshuffle=False,  # the epoch's permutation above is the shard shuffle, the same on every rank
            nodesplitter=wds.split_by_node if by_shard else None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        # Split by sample, every process must shuffle alike (then each keeps its own indices).
        ds = ds.shuffle(shuffle_buffer, seed=f"samples:{seed}:{epoch}:{rank if by_shard else 'all'}")
        yielded = 0
        for index, raw in enumerate(ds):
            if not by_shard and index % world_size != rank:
                continue
            meta = meta_of(raw)
            if not visits(meta, seed, epoch) or (keep is not None and not keep(meta)):
                continue
            yielded += 1
            if skip > 0:
                skip -= 1
                continue
            yield raw
        if yielded == 0:
            raise StreamError(
                f"epoch {epoch}: no training sample for process {rank} of {world_size} in {len(urls)} shard(s)"
            )
        epoch += 1


class MixedStream:
    """Pairs (of one ``style``, if given) and "reconstruct." clips mixed by ``recon_ratio``, with a resumable
    position.

    Whether sample ``i`` of this process is a reconstruction clip is drawn from an RNG seeded by
    (seed, rank, i) alone, so the position is just the three counters in :attr:`position`.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        seed: int,
        rank: int,
        world_size: int,
        recon_ratio: float,
        position: dict[str, int] | None = None,
        style: str | None = None,
    ) -> None:
        self.seed, self.rank, self.recon_ratio = seed, rank, recon_ratio
        self.position = dict(position or {"samples": 0, "pairs": 0, "recon": 0})
        common = {"seed": seed, "rank": rank, "world_size": world_size}

        def is_pair(meta: dict[str, Any]) -> bool:
            return not is_reconstruction(meta) and (style is None or meta.get("style") == style)

        self._pairs = sample_stream(shards, keep=is_pair, skip=self.position["pairs"], **common)
        # Opened lazily on the first draw: with recon_ratio 0 the reconstruction clips are never read.
        self._recon = sample_stream(shards, keep=is_reconstruction, skip=self.position["recon"], **common)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        i = self.position["samples"]
        recon = (
            self.recon_ratio > 0
            and random.Random(f"mix:{self.seed}:{self.rank}:{i}").random() < self.recon_ratio
        )
        try:
            raw = next(self._recon if recon else self._pairs)
        except StreamError as err:
            kind = '"reconstruct." clips (train.recon_ratio > 0)' if recon else "pair clips"
            raise StreamError(f"no {kind} in the training data: {err}") from None
        self.position["samples"] += 1
        self.position["recon" if recon else "pairs"] += 1
        return raw


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; prompt embeddings are zero-padded to the longest (Wan pads text with zeros, too)."""
    length = max(s["prompt_embeds"].shape[0] for s in samples)
    prompts = []
    for s in samples:
        p = s["prompt_embeds"]
        prompts.append(
            torch.cat([p, p.new_zeros(length - p.shape[0], p.shape[1])]) if p.shape[0] < length else p
        )
    return {
        "keys": [s.get("__key__", "") for s in samples],
        "latents": torch.stack([s["target"] for s in samples]),  # [b, z, f, h, w]
        "context": torch.stack([s["context"] for s in samples]),  # [b, 96, f, h, w]
        "prompt_embeds": torch.stack(prompts),  # [b, L, D]
    }
