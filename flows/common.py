"""What every stage flow shares: params from ``params.yaml`` (+ ``-S key=value`` overrides) and a summary artifact."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml
from prefect.artifacts import create_markdown_artifact

from pickstyle.config import Params, load_params


def stage_params(argv: list[str] | None = None, description: str = "") -> tuple[Params, dict[str, Any]]:
    """Parse ``--params`` and ``-S key=value`` from the command line; returns (params, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
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
