"""``mdcsrn-report --html``: the report as one self-contained HTML file.

Everything is inside the file: the CSS in a ``<style>`` element and every figure as a
base64 PNG ``data:`` URI, so it can be mailed, archived or opened on a machine with no
network and no other files. It holds, per table (sweep), the paper's layout (PSNR / SSIM /
NRMSE as mean ± std, #params, seconds per volume; the best model value of each metric in
bold), then the validation PSNR and SSIM curves and every run's test slice panel
(LR | SR | [GAN-SR |] HR | error, with the zoomed inset).

Each score cell carries its unrounded numbers (``data-mean``, ``data-std``), so the page
can be checked against ``metrics.json`` without parsing the rounded text.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from mdcsrn_lightning.evaluation.report import METRICS, Report, Row, Table, format_params, format_score, format_seconds

__all__ = ["png_data_uri", "render_html"]

# lower is better for these columns; higher for the others
_LOWER_IS_BETTER = frozenset({"nrmse"})

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1300px; padding: 0 1rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
p.meta, p.caption { color: #555; font-size: 0.9rem; margin-top: 0.2rem; }
table.results { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.6rem 0; }
table.results th, table.results td { padding: 0.3rem 0.8rem; border-bottom: 1px solid #e4e4e4; }
table.results th { text-align: center; border-bottom: 2px solid #333; }
table.results td { text-align: right; white-space: nowrap; }
table.results td.name { text-align: left; }
table.results tr.baseline td { color: #666; }
table.results tr.model td { color: #111; }
table.results td.best { font-weight: 700; background: #e8f1fb; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #333; margin-bottom: 0.3rem; font-weight: 600; }
"""


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI; refuses a file that is not a PNG."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _best(table: Table) -> dict[str, float]:
    """The best mean of each metric over the table's model rows (ties: all of them bold)."""
    best: dict[str, float] = {}
    for key, _, _ in METRICS:
        values = [r.scores[key] for r in table.rows if r.kind == "model" and r.scores and key in r.scores]
        values = [v for v in values if math.isfinite(v)]
        if values:
            best[key] = min(values) if key in _LOWER_IS_BETTER else max(values)
    return best


def _score_cell(row: Row, key: str, digits: int, best: Mapping[str, float]) -> str:
    text = html.escape(format_score(row.scores, key, digits))
    if row.scores is None or key not in row.scores:
        return f'<td class="score" data-key="{key}">{text}</td>'
    mean = float(row.scores[key])
    std = row.scores.get(f"{key}_std")
    attrs = f' data-key="{key}" data-mean="{mean!r}"' + (f' data-std="{float(std)!r}"' if std is not None else "")
    is_best = row.kind == "model" and key in best and round(mean, digits) == round(best[key], digits)
    return f'<td class="score{" best" if is_best else ""}"{attrs}>{text}</td>'


def _table_html(table: Table) -> str:
    best = _best(table)
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in METRICS)
    lines = [
        '<table class="results">',
        f"<thead><tr><th></th>{head}<th>#params</th><th>time (s)</th></tr></thead>",
        "<tbody>",
    ]
    for row in table.rows:
        cells = "".join(_score_cell(row, key, digits, best) for key, _, digits in METRICS)
        if row.kind == "model":
            params = f'<td class="params" data-value="{row.params if row.params is not None else ""}">{html.escape(format_params(row.params))}</td>'
            seconds = row.seconds_per_volume
            value = repr(float(seconds)) if seconds is not None else ""
            time_cell = f'<td class="seconds" data-value="{value}">{html.escape(format_seconds(seconds))}</td>'
        else:
            params, time_cell = '<td class="params">N/A</td>', '<td class="seconds">N/A</td>'
        lines.append(
            f'<tr class="{row.kind}"><td class="name">{html.escape(row.name)}</td>{cells}{params}{time_cell}</tr>'
        )
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def render_html(
    report: Report,
    *,
    curves: str | Path | None = None,
    panels: Mapping[str, str | Path] | None = None,
    title: str = "mdcsrn-lightning results",
) -> str:
    """The whole page as a string.

    Args:
        report: the tables (:func:`~mdcsrn_lightning.evaluation.report.build_report`).
        curves: a PNG of the validation curves (``val_curves.png``), or ``None``: no section.
        panels: ``{row label: PNG}`` of the runs' test slice panels, in display order.
        title: the page's title and heading.
    """
    runs = report.runs
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s) in {len(report.tables)} table(s); written {stamp} by mdcsrn-report.</p>',
    ]
    for table in report.tables:
        body += [
            f'<section class="table" id="table-{html.escape(table.name, quote=True)}">',
            f"<h2>{html.escape(table.name)}</h2>",
            f'<p class="caption">{html.escape(table.caption())}</p>',
            _table_html(table),
            "</section>",
        ]
    if curves is not None:
        body += [
            '<section class="curves">',
            "<h2>Validation curves</h2>",
            '<p class="caption">From each run\'s CSV logger (csv/metrics.csv): validation PSNR and SSIM by training step.</p>',
            f'<figure><img alt="validation PSNR and SSIM by training step" src="{png_data_uri(curves)}"></figure>',
            "</section>",
        ]
    if panels:
        body += [
            '<section class="panels">',
            "<h2>Test slice panels</h2>",
            '<p class="caption">Middle slice of the first test subject in the degraded plane; the framed '
            "region is shown enlarged in the image corner farthest from it.</p>",
        ]
        for label, path in panels.items():
            name = html.escape(str(label))
            body.append(f'<figure><figcaption>{name}</figcaption><img alt="test panel of {name}" src="{png_data_uri(path)}"></figure>')
        body.append("</section>")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
