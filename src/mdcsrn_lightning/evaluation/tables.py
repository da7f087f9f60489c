"""Mean +- std tables in the paper's format (Table 1/2), as markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The one baseline table: the paper's name of each interpolation baseline (as the tables and
# every run's metrics.json name it, in the tables' order; paper: NN = nearest, bicubic ~
# tricubic) -> the degradation's interpolation.
BASELINES: dict[str, str] = {
    "nearest": "nearest",
    "trilinear": "linear",
    "tricubic": "cubic",
    "zero_filled": "zero_filled",
}
# other names accepted for a baseline
BASELINE_ALIASES: dict[str, str] = {"linear": "trilinear", "cubic": "tricubic", "sinc": "zero_filled",
                                    "zero-filled": "zero_filled"}
COLUMNS = (("psnr", "PSNR", 2), ("ssim", "SSIM", 4), ("nrmse", "NRMSE", 4))


def mean_std(rows: Sequence[Mapping[str, Any]], key: str, *, missing_ok: bool = False) -> tuple[float, float] | None:
    """Mean and (population) std of ``row[key]`` over ``rows``.

    ``missing_ok``: only the rows where ``key`` is present, not ``None`` and finite count, and
    ``None`` is returned when none is (a metric some subjects lack). Otherwise every row must
    have ``key`` (``None``: no rows).
    """
    if missing_ok:
        rows = [r for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    if not rows:
        return None
    values = np.asarray([r[key] for r in rows], dtype=np.float64)
    return float(values.mean()), float(values.std())


def format_mean_std(pair: tuple[float, float] | None, digits: int, missing: str = "n/a") -> str:
    """``"mean ± std"`` with ``digits`` decimals (``missing`` for ``None``)."""
    if pair is None:
        return missing
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def summarise_methods(per_method: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """``{method: [per-subject rows]}`` -> ``{method: {"psnr": mean, "psnr_std": std, ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for method, rows in per_method.items():
        out[method] = {"n_subjects": len(rows)}
        for key, _, _ in COLUMNS:
            out[method][key], out[method][f"{key}_std"] = mean_std(rows, key) or (math.nan, math.nan)
    return out


def markdown_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """One row per method: PSNR / SSIM / NRMSE as mean +- std."""
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for method, s in summary.items():
        cells = [format_mean_std((s[k], s[k + "_std"]), d) for k, _, d in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as CSV text with a header line; ``columns=None``: every key of the rows, in the
    order they first appear. A row without a column leaves its cell empty."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
