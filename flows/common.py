"""What every stage flow shares: params from ``params.yaml`` (+ ``-S key=value`` overrides) and a summary artifact."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from pickstyle.config import Params, load_params, parse_overrides


def stage_params(argv: list[str] | None = None, description: str = "") -> tuple[Params, dict[str, Any]]:
    """Parse ``--params`` and ``-S key=value`` from the command line; returns (params, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    return load_params(args.params, overrides), overrides


def summary_artifact(key: str, title: str, summary: dict[str, Any]) -> None:
    """A markdown artifact in the Prefect UI with the stage's summary (a table of scalars, the rest as JSON)."""
    rows = [(k, v) for k, v in summary.items() if isinstance(v, int | float | str | bool)]
    rest = {k: v for k, v in summary.items() if not isinstance(v, int | float | str | bool)}
    md = [f"# {title}", "", "| key | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    if rest:
        md += ["", "```json", json.dumps(rest, indent=2, default=str)[:20000], "```"]
    create_markdown_artifact(key=key, markdown="\n".join(md), description=title)


#: Largest GIF embedded in an artifact (the Prefect UI renders it inline as a data URI).
MAX_INLINE_PREVIEW = 2_000_000


def gif_artifact(key: str, title: str, caption: str, preview: Path) -> None:
    """A GIF preview as a markdown artifact: inline when small enough, else its path."""
    if not preview.is_file():
        return
    data = preview.read_bytes()
    if len(data) <= MAX_INLINE_PREVIEW:
        body = f"![{title}](data:image/gif;base64,{base64.b64encode(data).decode()})"
    else:
        body = f"Preview: `{preview.resolve()}` ({len(data) / 1e6:.1f} MB, too large to inline)"
    md = f"# {title}\n\n{caption}\n\n{body}\n\nFile: `{preview.resolve()}`\n"
    create_markdown_artifact(key=key, markdown=md, description=caption)
