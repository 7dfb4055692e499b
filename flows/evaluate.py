"""Stage ``evaluate``: stylize the held-out test clips with each variant and score them. ``python -m flows.evaluate``.

Prefect UI artifacts: a markdown summary of the metrics, a table (one row per variant) and the side-by-side
preview (source | no adapter | cfg | cs_cfg | ground truth), inline when small enough.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import gif_artifact, stage_params
from pickstyle.config import Params
from pickstyle.evaluate import evaluate


def metrics_table(metrics: dict[str, float]) -> list[dict[str, object]]:
    """``{"cfg/edge_f1": x, "cfg/edge_f1_se": e, ...}`` -> one row per variant with a column per metric, the
    value as ``"x ± e"`` when its standard error is known (blank where absent). Per-style keys are left out."""
    rows: dict[str, dict[str, object]] = {}
    for key, value in metrics.items():
        if key.startswith("style/") or key.endswith("_se"):
            continue
        variant, _, metric = key.partition("/")
        se = metrics.get(f"{key}_se")
        cell: object = round(value, 4) if se is None else f"{value:.4g} ± {se:.2g}"
        rows.setdefault(variant, {"variant": variant})[metric] = cell
    columns = ["variant", *sorted({k for r in rows.values() for k in r} - {"variant"})]
    return [{c: r.get(c, "") for c in columns} for r in rows.values()]


def _per_style_markdown(metrics: dict[str, float]) -> list[str]:
    """Style PSNR per style (rows) and variant (columns), from the ``style/<style>/<variant>/style_psnr`` keys."""
    cells: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "style" and len(parts) == 4:
            cells.setdefault(parts[1], {})[parts[2]] = value
    if not cells:
        return []
    variants = sorted({v for row in cells.values() for v in row})
    return [
        "Style PSNR to the ground truth, per style:",
        "",
        "| style | " + " | ".join(variants) + " |",
        "|" + "---|" * (len(variants) + 1),
        *(
            f"| {s} | " + " | ".join(f"{row.get(v, float('nan')):.2f}" for v in variants) + " |"
            for s, row in sorted(cells.items())
        ),
        "",
    ]


def metrics_markdown(summary: dict) -> str:
    """The metrics summary as markdown: a table per variant plus what each metric means."""
    table = metrics_table(summary["metrics"])
    columns = list(table[0]) if table else []
    md = [
        "# Evaluation on held-out test clips",
        "",
        f"{summary['clips']} clips; variants: {', '.join(summary['variants'])}; MLflow run `{summary['mlflow_run_id']}`.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in table),
        "",
        "warp_error ↓ (temporal consistency, flow of the source; `source`/`ground_truth` rows are references) · "
        "structure_ssim ↑, edge_f1 ↑ (vs the source) · style_psnr ↑, style_ssim ↑, color_dist ↓, texture_dist ↓ "
        "(vs the exact ground-truth style clip) · source_psnr ↑ (`vae`, `reconstruct`: the backbone reproduces the "
        "source). Values are means over clips ± one standard error.",
        "",
        *_per_style_markdown(summary["metrics"]),
        "Seconds per clip: " + ", ".join(f"{k} {v}" for k, v in summary["seconds_per_clip"].items()),
    ]
    return "\n".join(md)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish(summary: dict) -> None:
    """Prefect UI artifacts (API I/O, hence the retries)."""
    create_markdown_artifact(
        key="evaluate-summary", markdown=metrics_markdown(summary), description="metrics"
    )
    create_table_artifact(
        key="evaluate-metrics",
        table=metrics_table(summary["metrics"]),
        description="mean metrics per variant",
    )
    gif_artifact(
        "evaluate-preview",
        "Evaluation preview",
        "Columns: source | no adapter | cfg | cs_cfg | ground truth.",
        Path(summary["eval_dir"]) / "preview.gif",
    )


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: Params) -> dict:
    summary = evaluate(params)
    publish(summary)
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    evaluate_flow(params)
