"""``pickstyle exps``: DVC experiments side by side, in a table that fits a terminal.

``dvc exp show`` prints every param and metric (~450 columns here) and folds what does not fit into "…". This
table keeps what a tuning loop compares: the params that differ between the rows, the split the metrics were
measured on, and the style PSNR of the backbone alone and of the adapter, their gain, the standard error, the
worst style's gain (issue 18 asks for +2 on every style) and ``reconstruct.``.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any

from pickstyle.errors import PickstyleError

#: Columns of ``dvc.api.exp_show()`` rows that describe the row, not a param, metric or dependency.
META = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
#: A dependency's or output's hash, as ``dvc.api.exp_show()`` lists them beside params and metrics.
_HASH = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_STYLE = re.compile(r"^style/([^/]+)/cs_cfg/style_psnr$")
#: DVC names a column ``<file>:<name>`` when two params or metrics files share the name.
_FILE_PREFIX = re.compile(r"^[^:]+\.(?:json|ya?ml|toml|py):")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {_FILE_PREFIX.sub("", k): v for k, v in row.items()}


class ExperimentsError(PickstyleError):
    """The experiments cannot be read (not a DVC project, not a git repository)."""


def _is_param(key: str, value: Any) -> bool:
    return key not in META and "/" not in key and not (isinstance(value, str) and _HASH.match(value))


def _has_params(row: dict[str, Any]) -> bool:
    return any(_is_param(k, v) and v not in (None, "None") for k, v in row.items())


def changed_params(rows: list[dict[str, Any]]) -> list[str]:
    """The params whose values are not the same in every row that has params (``evaluate.split`` has its own
    column; a queued or failed experiment's row, all ``None``, changes nothing)."""
    rows = [r for r in rows if _has_params(r)]
    keys = sorted({k for row in rows for k, v in row.items() if _is_param(k, v)} - {"evaluate.split"})
    return [k for k in keys if len({str(row.get(k)) for row in rows}) > 1]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """One experiment's numbers: base, adapter, gain, its standard error, the worst style, ``reconstruct.``."""
    base, adapter = _number(row.get("base/style_psnr")), _number(row.get("cs_cfg/style_psnr"))
    gains = {
        m.group(1): _number(v) - _number(row.get(f"style/{m.group(1)}/base/style_psnr"))
        for k, v in row.items()
        if (m := _STYLE.match(k))
    }
    gains = {s: g for s, g in gains.items() if math.isfinite(g)}
    worst = min(gains, key=gains.__getitem__) if gains else None
    return {
        "base": base,
        "adapter": adapter,
        "gain": adapter - base,
        "se": _number(row.get("cs_cfg/style_psnr_se")),
        "worst": f"{worst} {gains[worst]:+.2f}" if worst else "-",
        "reconstruct": _number(row.get("reconstruct/source_psnr")),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return "-" if value in (None, "None", "") else str(value)


def _param_cell(value: Any) -> str:
    # dvc.api.exp_show() gives every number as a float: 300.0 -> 300, 0.002 -> 0.002
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return _cell(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """``dvc.api.exp_show()`` rows as a plain-text table (one line per experiment, then a legend)."""
    rows = [_plain(r) for r in rows]
    params = changed_params(rows)
    header = ["experiment", "split", *params, "base", "adapter", "gain", "se", "worst style", "reconstruct"]
    lines = []
    for row in rows:
        name = row.get("Experiment") or row.get("rev") or "?"
        if row.get("Experiment") and row.get("rev"):
            name = f"{name} ({str(row['rev'])[:7]})"
        if row.get("State") not in (None, "", "Success"):  # Queued, Running, Failed: no (or partial) numbers
            name = f"{name} [{str(row['State']).lower()}]"
        numbers = summarize(row)
        lines.append(
            [
                name,
                _cell(row.get("evaluate.split")),
                *(_param_cell(row.get(k)) for k in params),
                *(
                    f"{numbers[k]:+.2f}" if k == "gain" and math.isfinite(numbers[k]) else _cell(numbers[k])
                    for k in ("base", "adapter", "gain", "se", "worst", "reconstruct")
                ),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    text = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *lines]
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    legend = (
        "style PSNR (dB) to the exact ground truth: base = the backbone alone, adapter = cs_cfg, se = the "
        "adapter's standard error over clips; worst style = the smallest per-style gain over the base; params: "
        "those that differ between the rows" + ("" if params else " (none)")
    )
    text += ["", textwrap.fill(legend, 100)]
    return "\n".join(text)


def show(repo: str | None = None, num: int = 1) -> str:
    """The table for the project at ``repo`` (default: the current one): its workspace, ``HEAD`` and the
    experiments made from the last ``num`` commits (negative: all)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        rows = dvc.api.exp_show(repo=repo, num=num)
    except DvcException as err:  # not a DVC project, not a git repository, ...
        raise ExperimentsError(f"{repo or '.'}: {err}") from None
    return format_table(rows)


__all__ = ["ExperimentsError", "changed_params", "format_table", "show", "summarize"]
