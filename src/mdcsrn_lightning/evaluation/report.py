"""Paper-format tables and figures from finished runs (no W&B web UI, no network).

A *run* is a folder written by ``mdcsrn-train``: ``metrics.json`` (model and interpolation
baselines on the test split, see ``training/results.py``), ``.hydra/`` (its config, tags and
overrides), ``csv/metrics.csv`` (the CSV logger: ``val/psnr`` by ``step``) and
``panels/test.png``. The CSV logger always runs beside W&B, so W&B's own files are never
read (its binary log is only readable through W&B's private modules): a W&B run folder
(``<run>/wandb/offline-run-*``) given as a path stands for the run folder around it.

Runs are grouped into *tables* by their W&B group (the sweep: ``table1_exp3``), else by
their multirun folder. Each table lists the interpolation baselines once (every run on the
same data scores them identically; if they differ, each distinct result is listed) and
then one row per run, named by its tags (the paper's row), else by the overrides that
differ between the table's runs, else by its folder name.

    report = build_report([Path("logs/train/multiruns/2026-11-26_07-00-00_000000")])
    print(report.markdown())
    report.write(Path("report"))   # report.md, report.csv, val_psnr.png, val_curves.png, panels.png, panels/
    report.write(Path("report"), html=True)   # and report.html: all of it in one file
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mdcsrn_lightning.atomic import write_text
from mdcsrn_lightning.evaluation.panels import pyplot, safe_name, save_figure
from mdcsrn_lightning.evaluation.tables import BASELINES, COLUMNS, csv_text, format_mean_std

__all__ = [
    "BASELINE_ORDER",
    "Report",
    "ReportError",
    "Row",
    "Run",
    "Table",
    "build_report",
    "find_runs",
    "format_params",
    "format_score",
    "format_seconds",
    "read_run",
]

# Interpolation baselines in the order the tables list them (the one table: tables.py)
BASELINE_ORDER = tuple(BASELINES)
# (key, title, digits): the columns metrics.json holds (written through tables.summarise_methods)
METRICS = COLUMNS
# the validation curves read from the CSV logger's metrics.csv, with their axis labels
CURVE_KEYS: dict[str, str] = {"val/psnr": "validation PSNR (dB)", "val/ssim": "validation SSIM"}
_SKIP_DIRS = {"checkpoints", "csv", "panels", "wandb", "cache"}


class ReportError(ValueError):
    """Nothing to report: a missing path, or no runs in it."""


@dataclass
class Run:
    """One finished (or failed) training run, as read from its folder."""

    path: Path
    table: str
    tags: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None
    # {method: {"psnr", "psnr_std", "ssim", ...}}; "model" is the trained network
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    params: int | None = None
    seconds_per_volume: float | None = None
    volume_shape: list[int] | None = None
    split: str | None = None
    # (step, val/psnr) of the validation passes
    curve: list[tuple[int, float]] = field(default_factory=list)
    # {"val/psnr": [(step, value)], "val/ssim": [...]}: every key of CURVE_KEYS the CSV holds
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    panel: Path | None = None

    @property
    def has_results(self) -> bool:
        return "model" in self.methods


@dataclass
class Row:
    """One table row: a run's model or an interpolation baseline."""

    name: str
    kind: str  # "model" | "baseline"
    scores: dict[str, float] | None
    params: int | None = None
    seconds_per_volume: float | None = None
    run: Run | None = None


@dataclass
class Table:
    name: str
    runs: list[Run]
    rows: list[Row]

    def markdown(self) -> str:
        """The paper's layout: PSNR / SSIM / NRMSE as mean ± std, #params, seconds per volume."""
        header = "| | " + " | ".join(title for _, title, _ in METRICS) + " | #params | time (s) |"
        lines = [header, "|---" * (len(METRICS) + 3) + "|"]
        for row in self.rows:
            cells = [format_score(row.scores, key, digits) for key, _, digits in METRICS]
            params = format_params(row.params) if row.kind == "model" else "N/A"
            seconds = format_seconds(row.seconds_per_volume) if row.kind == "model" else "N/A"
            lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {params} | {seconds} |")
        return "\n".join(lines)

    def caption(self) -> str:
        done = [r for r in self.runs if r.has_results]
        parts = [f"{len(self.runs)} run(s)"]
        if len(done) < len(self.runs):
            parts.append(f"{len(self.runs) - len(done)} without results (failed or still running: '—')")
        splits = sorted({r.split for r in done if r.split})
        subjects = sorted({int(r.methods["model"].get("n_subjects", 0)) for r in done if "n_subjects" in r.methods["model"]})
        shapes = sorted({"x".join(map(str, r.volume_shape)) for r in done if r.volume_shape})
        if splits:
            parts.append(f"{'/'.join(splits)} split")
        if subjects:
            parts.append(f"{'/'.join(map(str, subjects))} subject(s)")
        if shapes:
            parts.append(f"volume {'/'.join(shapes)}")
        text = "; ".join(parts) + ". Mean ± std over subjects, slice-wise in the degraded plane"
        return text + "; time: seconds per whole-volume forward pass on the run's device."


@dataclass
class Report:
    tables: list[Table]

    @property
    def runs(self) -> list[Run]:
        return [run for table in self.tables for run in table.runs]

    def markdown(self, figures: Sequence[str] = ()) -> str:
        out = []
        for table in self.tables:
            out += [f"## {table.name}", "", table.caption(), "", table.markdown(), ""]
        for fig in figures:
            out += [f"![{Path(fig).stem}]({fig})", ""]
        return "\n".join(out).rstrip() + "\n"

    def csv(self) -> str:
        """One line per row of every table, numbers unformatted."""
        score_keys = [*(k for key, _, _ in METRICS for k in (key, f"{key}_std")), "n_subjects"]
        columns = ["table", "row", "kind", *score_keys, "params", "params_M", "seconds_per_volume", "split", "volume_shape", "run_dir"]
        lines: list[dict[str, Any]] = []
        for table in self.tables:
            for row in table.rows:
                line: dict[str, Any] = {"table": table.name, "row": row.name, "kind": row.kind}
                for key in score_keys:
                    line[key] = "" if row.scores is None or key not in row.scores else row.scores[key]
                if row.params is not None:
                    line["params"] = row.params
                    line["params_M"] = round(row.params / 1e6, 4)
                if row.seconds_per_volume is not None:
                    line["seconds_per_volume"] = row.seconds_per_volume
                if row.run is not None:
                    line["split"] = row.run.split or ""
                    line["volume_shape"] = "x".join(map(str, row.run.volume_shape or []))
                    line["run_dir"] = str(row.run.path)
                lines.append(line)
        return csv_text(lines, columns)

    def write(self, out_dir: Path, figures: bool = True, html: bool = False) -> dict[str, Path]:
        """Write ``report.md``, ``report.csv`` and (``figures``) ``val_psnr.png``,
        ``val_curves.png`` (PSNR and SSIM), ``panels.png`` and ``panels/<table>__<row>.png``
        into ``out_dir``; with ``html``, also ``report.html``: the tables and those figures in
        one self-contained file (:mod:`.html_report`). Returns the paths written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        names: list[str] = []
        panels: dict[str, Path] = {}
        if figures:
            curves = plot_val_psnr(self, out_dir / "val_psnr.png")
            if curves is not None:
                written["val_psnr"] = curves
                names.append(curves.name)
            both = plot_val_curves(self, out_dir / "val_curves.png")
            if both is not None:
                written["val_curves"] = both
            panels = collect_panels(self, out_dir)
            if panels:
                written.update({f"panel:{k}": v for k, v in panels.items()})
                composite = compose_panels(panels, out_dir / "panels.png")
                if composite is not None:
                    written["panels"] = composite
                    names.append(composite.name)
        written["markdown"] = write_text(out_dir / "report.md", "# Results\n\n" + self.markdown(names))
        written["csv"] = write_text(out_dir / "report.csv", self.csv())
        if html:
            from mdcsrn_lightning.evaluation.html_report import render_html

            page = render_html(self, curves=written.get("val_curves"), panels=panels)
            written["html"] = write_text(out_dir / "report.html", page)
        return written


# ------------------------------------------------------------------------ formatting
def format_params(n: int | None) -> str:
    """Parameters in millions as the paper prints them: 228961 -> '0.23M' (small: '0.0046M')."""
    if n is None:
        return "—"
    m = n / 1e6
    if m >= 0.01:
        return f"{m:.2f}M"
    return f"{m:.2g}M"


def format_seconds(s: float | None) -> str:
    return "—" if s is None or not math.isfinite(s) else f"{s:.2f}"


def format_score(scores: Mapping[str, float] | None, key: str, digits: int) -> str:
    if scores is None or key not in scores:
        return "—"
    std = scores.get(f"{key}_std")
    return f"{scores[key]:.{digits}f}" if std is None else format_mean_std((scores[key], std), digits)


# ------------------------------------------------------------------------ reading runs
def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _read_curves(run_dir: Path, keys: Sequence[str] = tuple(CURVE_KEYS)) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value)]}`` from the CSV logger's ``metrics.csv`` (``csv/`` or ``csv/version_*``);
    keys the files never hold are left out."""
    files = sorted((run_dir / "csv").glob("**/metrics.csv")) if (run_dir / "csv").is_dir() else []
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            for line in csv.DictReader(f):
                step = line.get("step")
                if step in (None, ""):
                    continue
                for key in keys:
                    value = line.get(key)
                    if value not in (None, ""):
                        points[key][int(float(step))] = float(value)
    return {key: sorted(values.items()) for key, values in points.items() if values}


def _multirun_root(run_dir: Path) -> Path | None:
    parent = run_dir.parent
    return parent if (parent / "multirun.yaml").is_file() else None


def read_metrics_json(path: Path) -> dict[str, Any]:
    """A run's ``metrics.json``, checked for the shape the report reads; :class:`ReportError` names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path}: not readable as JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object with 'methods', got {type(data).__name__}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise ReportError(f"{path}: 'methods' must map each method to its metrics (an object of objects)")
    return data


def read_run(run_dir: Path) -> Run:
    """A run folder of ``mdcsrn-train`` (``metrics.json`` may be missing: a failed run)."""
    run_dir = Path(run_dir)
    config = _load_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra_cfg = (_load_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
    overrides = _load_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    group = ((config.get("logger") or {}).get("wandb") or {}).get("group")
    root = _multirun_root(run_dir)
    table = str(group) if group else (root.name if root is not None else "runs")
    job_num = (hydra_cfg.get("job") or {}).get("num")
    run = Run(
        path=run_dir,
        table=table,
        tags=[str(t) for t in (config.get("tags") or [])],
        overrides=[str(o) for o in overrides],
        job_num=int(job_num) if isinstance(job_num, int) else None,
        curves=_read_curves(run_dir),
    )
    run.curve = run.curves.get("val/psnr", [])
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        data = read_metrics_json(metrics_path)
        run.methods = {k: dict(v) for k, v in (data.get("methods") or {}).items()}
        run.params = data.get("params")
        run.seconds_per_volume = data.get("seconds_per_volume")
        run.volume_shape = data.get("volume_shape")
        run.split = data.get("split")
        recorded = Path(data["panel"]) if data.get("panel") else None
    else:
        recorded = None
    # moved run folders: the recorded path is stale, the run's own panels/ is not
    panel = recorded if recorded is not None and recorded.is_file() else run_dir / "panels" / "test.png"
    run.panel = panel if panel.is_file() else None
    return run


def _is_wandb_run_dir(path: Path) -> bool:
    return path.name.startswith("offline-run-") or (path.name.startswith("run-") and any(path.glob("run-*.wandb")))


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def _walk(path: Path) -> Iterable[Path]:
    """Folders under ``path`` (itself included), not descending into a run's own subfolders."""
    yield path
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return
    is_run = _is_run_dir(path)
    for child in children:
        if child.name.startswith("."):  # .hydra, .submitit, ...: never runs themselves
            continue
        if child.name in _SKIP_DIRS and is_run:
            # a run's checkpoints/csv/panels hold no runs; its wandb/ is read through the run
            continue
        if _is_wandb_run_dir(child):  # W&B's files: read through the run folder around them
            continue
        yield from _walk(child)


def _run_around(wandb_dir: Path) -> Path:
    """The ``mdcsrn-train`` run folder that holds a W&B run folder (``<run>/wandb/offline-run-*``)."""
    for parent in wandb_dir.resolve().parents:
        if _is_run_dir(parent):
            return parent
    raise ReportError(
        f"{wandb_dir}: a W&B run folder outside an mdcsrn-train run folder; the report reads the "
        "run folder's metrics.json and csv/metrics.csv (W&B's own files are not read)"
    )


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run in ``paths`` (run folders, multirun folders, parents of them, W&B run folders).

    Raises:
        ReportError: a path that does not exist, or no run in any of them.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_file() and path.name == "metrics.json":
            path = path.parent
        if not path.exists():
            raise ReportError(f"{path}: no such file or directory")
        if _is_wandb_run_dir(path):
            path = _run_around(path)
        found: list[Run] = []
        for folder in _walk(path):
            resolved = folder.resolve()
            if resolved in seen:
                continue
            if _is_run_dir(folder):
                seen.add(resolved)
                found.append(read_run(folder))
        found.sort(key=lambda r: (str(_multirun_root(r.path) or r.path.parent), r.job_num if r.job_num is not None else -1, str(r.path)))
        runs += found
    if not runs:
        raise ReportError(
            ", ".join(map(str, paths)) + ": no runs found (no metrics.json or .hydra/config.yaml inside)"
        )
    return runs


# ------------------------------------------------------------------------ tables
def _row_names(runs: Sequence[Run]) -> list[str]:
    """Tags (the paper row), else the overrides in which the runs differ, else the folder."""
    override_sets = [set(r.overrides) for r in runs]
    common = set.intersection(*override_sets) if override_sets else set()
    names = []
    for run in runs:
        if run.tags:
            name = " ".join(run.tags)
        else:
            differing = [o for o in run.overrides if o not in common]
            name = " ".join(differing) if differing and len(runs) > 1 else run.path.name
        names.append(name)
    # duplicates (the same row trained twice, e.g. two seeds): tell them apart by folder
    for name in set(names):
        if names.count(name) > 1:
            names = [f"{n} [{r.path.name}]" if n == name else n for n, r in zip(names, runs)]
    return names


def _scores_key(scores: Mapping[str, float]) -> tuple[float, ...]:
    return tuple(round(float(scores.get(k, float("nan"))), 6) for k, _, _ in METRICS)


def _baseline_rows(runs: Sequence[Run], names: Sequence[str]) -> list[Row]:
    """Each interpolation baseline once; several rows only where runs disagree (other data)."""
    found: dict[str, dict[tuple[float, ...], tuple[dict[str, float], list[str]]]] = {}
    for run, name in zip(runs, names):
        for method, scores in run.methods.items():
            if method == "model":
                continue
            entry = found.setdefault(method, {}).setdefault(_scores_key(scores), (scores, []))
            entry[1].append(name)
    order = [m for m in BASELINE_ORDER if m in found] + sorted(m for m in found if m not in BASELINE_ORDER)
    rows = []
    for method in order:
        variants = found[method]
        for scores, who in variants.values():
            label = method if len(variants) == 1 else f"{method} ({', '.join(who)})"
            rows.append(Row(name=label, kind="baseline", scores=dict(scores)))
    return rows


def build_tables(runs: Sequence[Run]) -> list[Table]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.table, []).append(run)
    tables = []
    for name, members in grouped.items():
        names = _row_names(members)
        rows = _baseline_rows(members, names)
        for run, row_name in zip(members, names):
            rows.append(
                Row(
                    name=row_name,
                    kind="model",
                    scores=run.methods.get("model"),
                    params=run.params,
                    seconds_per_volume=run.seconds_per_volume,
                    run=run,
                )
            )
        tables.append(Table(name=name, runs=members, rows=rows))
    return tables


def build_report(paths: Sequence[str | Path]) -> Report:
    """Find the runs in ``paths`` and lay them out as the paper's tables."""
    return Report(tables=build_tables(find_runs(paths)))


# ------------------------------------------------------------------------ figures
def _model_rows(report: Report) -> list[tuple[str, Row]]:
    several = len(report.tables) > 1
    return [
        (f"{t.name}/{r.name}" if several else r.name, r)
        for t in report.tables
        for r in t.rows
        if r.kind == "model" and r.run is not None
    ]


def _draw_curves(ax: Any, curves: list[tuple[str, Any]], ylabel: str) -> None:
    """One line per ``(label, [(step, value), ...])`` against training step."""
    for label, curve in curves:
        steps, values = zip(*curve)
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_val_psnr(report: Report, path: Path) -> Path | None:
    """Validation PSNR against training step, every run on one plot (None: no curves)."""
    curves = [(label, row.run.curve) for label, row in _model_rows(report) if row.run and row.run.curve]
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        _draw_curves(ax, curves, "validation PSNR (dB)")
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_val_curves(report: Report, path: Path) -> Path | None:
    """Validation PSNR and SSIM against training step, side by side, every run on both
    (None: no run logged either)."""
    keys = [k for k in CURVE_KEYS if any(row.run and row.run.curves.get(k) for _, row in _model_rows(report))]
    if not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.2), squeeze=False)
    try:
        for ax, key in zip(axes[0], keys):
            curves = [(label, row.run.curves[key]) for label, row in _model_rows(report) if row.run and row.run.curves.get(key)]
            _draw_curves(ax, curves, CURVE_KEYS[key])
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def collect_panels(report: Report, out_dir: Path) -> dict[str, Path]:
    """Copy each run's test slice panel to ``out_dir/panels/<table>__<row>.png``."""
    panels: dict[str, Path] = {}
    for label, row in _model_rows(report):
        if row.run is None or row.run.panel is None:
            continue
        target = out_dir / "panels" / f"{safe_name(row.run.table, 'run')}__{safe_name(row.name, 'run')}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row.run.panel, target)
        panels[label] = target
    return panels


def compose_panels(panels: Mapping[str, Path], path: Path) -> Path | None:
    """The slice panels of all runs stacked into one figure, titled by row."""
    if not panels:
        return None
    plt = pyplot()
    images = {label: plt.imread(str(p)) for label, p in panels.items()}
    width = max(im.shape[1] for im in images.values()) / 100
    heights = [im.shape[0] / 100 + 0.3 for im in images.values()]
    fig, axes = plt.subplots(len(images), 1, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    try:
        for ax, (label, image) in zip(axes[:, 0], images.items()):
            ax.imshow(image)
            ax.set_title(label, fontsize=10, loc="left")
            ax.axis("off")
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)
