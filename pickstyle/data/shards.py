"""WebDataset shard I/O shared by every stage.

Writing: :class:`ShardSink` fills ``<prefix>-%06d.tar`` files of ``shard_size`` samples each. Every shard is written
under a temporary name and renamed when complete, with fixed tar metadata (mtime 0, fixed owner), so the same
samples give byte-identical shards and a crash never leaves a half-written shard in place.

Reading: :func:`iter_samples` yields plain dicts (``__key__``, ``__url__`` and the raw bytes of each part); any
error while reading is re-raised as :class:`ShardError` naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path


class ShardError(PickstyleError):
    """A shard could not be read; the message starts with the shard's path."""


def check_key(key: str) -> str:
    """WebDataset splits a member name at the first dot: keys must not contain one (nor a slash)."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, without '.' or '/'")
    return key


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "pickstyle"
    tar.addfile(info, io.BytesIO(data))


class ShardSink:
    """Write samples (``{"__key__": str, "<ext>": bytes, ...}``) into numbered shards, atomically.

    Args:
        out_dir: Folder of the shards (created).
        prefix: Shard name prefix, e.g. ``pairs`` -> ``pairs-000000.tar``.
        shard_size: Samples per shard.

    Use as a context manager; :attr:`paths` lists the shards written. ``start`` numbers the first shard (a stage
    that resumes writes after the shards it kept).
    """

    def __init__(self, out_dir: str | Path, prefix: str, shard_size: int = 64, start: int = 0) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.shard_size = shard_size
        self.start = start  # number of the first shard (the ones before it are complete from an earlier run)
        self.paths: list[Path] = []
        self.count = 0
        self._buffer: list[dict[str, Any]] = []

    def __enter__(self) -> ShardSink:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, sample: dict[str, Any]) -> None:
        check_key(sample["__key__"])
        self._buffer.append(sample)
        self.count += 1
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        final = self.out_dir / f"{self.prefix}-{self.start + len(self.paths):06d}.tar"
        with atomic_path(final) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in self._buffer:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if not k.startswith("__")):
                    data = sample[ext]
                    if isinstance(data, str):
                        data = data.encode("utf-8")
                    _tar_member(tar, f"{key}.{ext}", bytes(data))
        self.paths.append(final)
        self._buffer = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._flush()


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str, shard_size: int = 64
) -> list[Path]:
    """Write all ``samples`` as shards; returns the shard paths."""
    with ShardSink(out_dir, prefix, shard_size) as sink:
        for s in samples:
            sink.write(s)
    return sink.paths


def list_shards(folder: str | Path, prefix: str) -> list[Path]:
    """The ``<prefix>-*.tar`` shards of ``folder``, sorted; a clear error when there are none."""
    folder = Path(folder)
    shards = sorted(folder.glob(f"{prefix}-*.tar"))
    if not shards:
        raise ShardError(f"{folder}: no {prefix}-*.tar shards (run the stage that writes them first)")
    return shards


def remove_shards(folder: str | Path, prefix: str) -> None:
    """Delete old ``<prefix>-*.tar`` shards (before a stage rewrites its folder)."""
    for p in Path(folder).glob(f"{prefix}-*.tar"):
        os.remove(p)


def check_complete(shard: str | Path) -> None:
    """Fail, naming the shard and the sample, when ``shard`` is not a tar or is cut short (a copy or a write that
    stopped half-way). Reads the member headers only."""
    shard = Path(shard)
    size = shard.stat().st_size if shard.is_file() else 0
    try:
        with tarfile.open(shard, "r") as tar:
            member = None
            for member in tar:
                if member.offset_data + member.size > size:
                    key = member.name.split(".", 1)[0]
                    have = max(0, size - member.offset_data)
                    raise ShardError(
                        f"{shard}: truncated at sample {key!r} ({member.name}: {have} of {member.size} bytes)"
                    )
            # A cut between two members reads as a shorter archive: the two zero end blocks are missing then.
            if member is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                key = member.name.split(".", 1)[0]
                raise ShardError(f"{shard}: truncated after {member.name} (sample {key!r} may be incomplete)")
    except ShardError:
        raise
    except (OSError, tarfile.TarError) as err:
        raise ShardError(f"{shard}: not a readable tar shard ({err})") from None


def iter_samples(shards: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Yield every sample of ``shards`` in order, as raw bytes; errors name the shard (and the sample when known)."""
    for shard in shards:
        shard = str(shard)
        check_complete(shard)  # fail early, naming the shard and the sample, on a broken or cut-short tar
        try:
            ds = wds.WebDataset(shard, shardshuffle=False, empty_check=False)
            yield from ds
        except ShardError:
            raise
        except Exception as err:  # webdataset surfaces tar/IO errors as many types
            raise ShardError(f"{shard}: {type(err).__name__}: {err}") from err


def files_fingerprint(files: Iterable[str | Path], sample: int = 1 << 20) -> list[list[Any]]:
    """Name, size and a hash of the first and last MiB of each file.

    Cheap on a terabyte of shards, and a rebuilt shard differs (new settings change its first sample).
    """
    out = []
    for f in files:
        f = Path(f)
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(size - sample)
                h.update(fh.read(sample))
        out.append([f.name, size, h.hexdigest()])
    return out


class ShardProgress:
    """The shards a stage completed before it was killed, kept for a rerun with the same settings.

    The stage's output folder is a ``persist: true`` DVC output (DVC does not delete it before a rerun).
    ``<folder>/.partial/`` holds the settings ``key`` and, per complete shard, a small JSON record written after
    the shard (so a record means a complete shard). Under other settings every shard and record is deleted
    first. :meth:`finish` removes ``.partial`` once the stage's output is complete, so finished outputs hold
    no bookkeeping.

    Args:
        folder: The stage's output folder (created).
        prefix: Shard name prefix.
        key: JSON-able settings that decide the shards' content.
    """

    def __init__(self, folder: str | Path, prefix: str, key: dict[str, Any]) -> None:
        self.folder, self.prefix = Path(folder), prefix
        self.dir = self.folder / ".partial"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = json.dumps(key, sort_keys=True, default=str)
        key_file = self.dir / "key.json"
        if not key_file.is_file() or key_file.read_text() != self._key:
            self.reset()
        done = sorted(self.done())
        self.resumed = len(done)
        if done:
            print(
                f"{prefix}: {len(done)} complete shard(s) kept from an interrupted run of the same settings"
            )

    def reset(self) -> None:
        """Delete every shard and record: the next shards start from scratch."""
        remove_shards(self.folder, self.prefix)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        (self.dir / "key.json").write_text(self._key)

    def done(self) -> dict[str, Any]:
        """Shard name -> its record, for every complete shard."""
        out = {}
        for rec in self.dir.glob(f"{self.prefix}-*.tar.json"):
            shard = self.folder / rec.name.removesuffix(".json")
            if shard.is_file():
                out[shard.name] = json.loads(rec.read_text())
        return out

    def record(self, shard: str | Path, result: dict[str, Any]) -> None:
        """Mark ``shard`` complete (call after it is written)."""
        record_shard(self.folder, shard, result)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def record_shard(folder: str | Path, shard: str | Path, result: dict[str, Any]) -> None:
    """Mark ``folder/shard`` complete for :class:`ShardProgress` (a plain function: render workers call it)."""
    with atomic_path(Path(folder) / ".partial" / f"{Path(shard).name}.json") as tmp:
        Path(tmp).write_text(json.dumps(result, sort_keys=True))
