"""Evaluate interpolation baselines and trained generators on HR references (paper Tables 2-3).

One reference's path: HR ``(X, Y, Z)`` -> k-space degradation (once per interpolation,
:func:`~mdcsrn_lightning.data.degradation.degrade`) -> each method's output on the HR grid:

* ``nearest`` / ``trilinear`` / ``tricubic`` / ``zero_filled``: the degraded volume itself
  (the LR grid put back on the HR grid by that interpolation);
* a checkpoint: the generator run patch-wise (:mod:`mdcsrn_lightning.inference`) on the
  LR made with the interpolation it was trained with (``input_interpolation``; default:
  read from the checkpoint, else ``linear``), normalised as in training and inference
  (divided by the LR's own 99.9th percentile,
  :func:`~mdcsrn_lightning.data.intensity.input_scale`, multiplied back after; nothing
  derived from the HR reaches the network); with ``data_consistency=True`` its central,
  measured band of k-space is then replaced by the LR's
  (:func:`~mdcsrn_lightning.data.degradation.data_consistency`);

-> scores against the HR:

* PSNR / SSIM / NRMSE slice by slice in the degraded plane (:func:`~.metrics.slice_metrics`,
  the SPEC protocol), one value per subject, then mean +- std over subjects (Table 2);
* NIQE / PIQE on the slices whose HR is more than 25 % foreground (:mod:`.perceptual`),
  plus a plain statement for each metric that cannot be computed (Ma, PI);
* Dice / Jaccard between stand-in tissue segmentations of the output and of the HR
  (:mod:`.segmentation`; not the paper's HighRes3DNet, and labelled so);
* a slice panel per subject (every method, the HR, and error maps on one colour scale).

:func:`write_outputs` puts the markdown tables, ``per_subject.csv``, ``summary.csv`` and
``results.json`` into an output folder.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mdcsrn_lightning.atomic import write_text
from mdcsrn_lightning.checkpoints import load_trained_model
from mdcsrn_lightning.data.degradation import data_consistency as apply_data_consistency
from mdcsrn_lightning.data.degradation import degrade, slice_axis
from mdcsrn_lightning.data.intensity import InputScaleRule, input_scale, trained_input_scale
from mdcsrn_lightning.evaluation.metrics import (
    foreground_slices,
    reference_scale,
    scale_to_unit,
    slice_metrics,
)
from mdcsrn_lightning.evaluation.panels import middle_slice, safe_name, save_panel
from mdcsrn_lightning.evaluation.perceptual import (
    available_metrics,
    perceptual_scores,
    summarise_perceptual,
)
from mdcsrn_lightning.evaluation.segmentation import (
    CLASS_NAMES,
    STAND_IN_LABEL,
    TissueModel,
    segmentation_consistency,
)
from mdcsrn_lightning.evaluation.tables import (
    BASELINE_ALIASES,
    BASELINES,
    csv_text,
    format_mean_std,
    markdown_table,
    mean_std,
    summarise_methods,
)
from mdcsrn_lightning.inference.options import InferenceOptions

__all__ = [
    "BASELINES",
    "CheckpointMethod",
    "EvalResult",
    "Reference",
    "checkpoint_methods",
    "evaluate",
    "jsonable",
    "references_from_files",
    "references_from_source",
    "write_outputs",
]

PERCEPTUAL_FOREGROUND = 0.25  # paper: slices where the brain covers more than 25 %
HR_NAME = "HR"


# ---------------------------------------------------------------------- references
@dataclass
class Reference:
    """One HR subject to evaluate on.

    Attributes:
        name: subject id (also the panel file name).
        hr: ``(X, Y, Z)`` float32, raw intensities.
        location: file path or description, for messages.
        scale: intensity reference of the metrics (``None``: the HR's 99.9th percentile; a
            slab of a template: the whole template's, as in training, so both report the
            same numbers). Never used to normalise a network's input.
        lr: an LR that comes with the data (on the HR grid), used as the checkpoints'
            input instead of a degradation; baselines always degrade ``hr``.
        degrader: ``(factors, interpolation) -> LR`` when the data source must make the LR
            itself (e.g. slabs of a template degraded whole); ``None``: degrade ``hr``.
    """

    name: str
    hr: np.ndarray
    location: str = ""
    scale: float | None = None
    lr: np.ndarray | None = None
    degrader: Callable[[Sequence[float], str], np.ndarray | None] | None = None

    def degraded(self, factors: Sequence[float], interpolation: str) -> np.ndarray:
        if self.degrader is not None:
            lr = self.degrader(factors, interpolation)
            if lr is not None:
                return np.asarray(lr, dtype=np.float32)
        return degrade(self.hr, factors=factors, interpolation=interpolation)  # type: ignore[arg-type]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    from mdcsrn_lightning.data.volume_io import volume_stem

    names = [volume_stem(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p).replace(os.sep, "_").strip("_") for p in paths]


def references_from_files(paths: Sequence[str | os.PathLike[str]]) -> list[Reference]:
    """HR volume files -> references. Every file is read and checked first (one bad file: error).

    The checks are the package's one reader's (:func:`~mdcsrn_lightning.data.volume_io.load_volume`)
    plus: not all zero or constant (a reference is scaled by its own intensities).
    """
    from mdcsrn_lightning.data.sources import warn_mixed_voxel_sizes
    from mdcsrn_lightning.data.volume_io import check_not_constant, load_volume

    if not paths:
        raise ValueError("inputs: no HR files given")
    files = [Path(p) for p in paths]
    names = _unique_names(files)
    refs = []
    sizes: dict[str, tuple[float, ...]] = {}
    for name, path in zip(names, files):
        volume = load_volume(path)
        check_not_constant(volume.data, str(path))
        sizes[str(path)] = volume.voxel_sizes
        refs.append(Reference(name=name, hr=volume.data, location=str(path)))
    warn_mixed_voxel_sizes(sizes, "inputs", "their metrics are compared across resolutions "
                           "(the degradation and the slices are per voxel, not per mm)")
    return refs


# the SSIM window (metrics._SSIM_KERNEL): a slice must be at least this wide in both directions
MIN_SLICE_SIDE = 11


def check_slice_size(shape: Sequence[int], axis: int, location: str) -> None:
    """Refuse a reference whose slices across ``axis`` are smaller than the SSIM window (one line)."""
    from mdcsrn_lightning.data.volume_io import VolumeError

    other = [a for a in range(3) if a != axis % 3]
    sides = [int(shape[a]) for a in other]
    if min(sides) < MIN_SLICE_SIDE:
        raise VolumeError(
            f"{location}: slices across axis {axis % 3} are {sides[0]}x{sides[1]} voxels (shape {tuple(int(n) for n in shape)}), "
            f"smaller than the {MIN_SLICE_SIDE}x{MIN_SLICE_SIDE} SSIM window; evaluation needs at least "
            f"{MIN_SLICE_SIDE} voxels along axes {other[0]} and {other[1]}"
        )


def _slice_checked(references: Iterable[Reference], axis: int) -> Iterator[Reference]:
    """``references``, each checked by :func:`check_slice_size`; a list (files) is checked
    whole before the first is handed out, so nothing is computed for a bad set."""
    if isinstance(references, Sequence):
        for ref in references:
            check_slice_size(np.shape(ref.hr), axis, ref.location)
    for ref in references:
        check_slice_size(np.shape(ref.hr), axis, ref.location)
        yield ref


def references_from_source(source: Any, names: Iterable[str]) -> Iterable[Reference]:
    """Lazily load subjects of a :class:`~mdcsrn_lightning.data.sources.VolumeSource`."""
    for name in names:
        vol = source.load(name)

        def degrader(factors: Sequence[float], interpolation: str, _name: str = name) -> np.ndarray | None:
            return source.degraded(_name, factors, interpolation)

        yield Reference(
            name=name,
            hr=np.asarray(vol.hr, dtype=np.float32),
            location=vol.location or source.location(name),
            scale=vol.scale,
            lr=vol.lr,
            degrader=degrader,
        )


# ---------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointMethod:
    """A trained generator as an evaluation method."""

    name: str
    net: nn.Module
    path: str = ""
    input_interpolation: str = "linear"
    input_scale: InputScaleRule = "lr_p99.9"
    trained_factors: list[float] | None = None


def _checkpoint_name(path: Path) -> str:
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem


def checkpoint_methods(
    paths: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[str] | None = None,
    input_interpolation: str | None = None,
) -> list[CheckpointMethod]:
    """Load generators from checkpoints (either module); names default to ``<run>/<file stem>``.

    ``input_interpolation=None``: each checkpoint's training interpolation (if recorded,
    else ``linear``).
    """
    if names and len(names) != len(paths):
        raise ValueError(f"ckpt_names: {len(names)} names for {len(paths)} checkpoints")
    out = []
    for i, p in enumerate(paths):
        model = load_trained_model(p)
        out.append(
            CheckpointMethod(
                name=names[i] if names else _checkpoint_name(model.path),
                net=model.net,
                path=str(model.path),
                input_interpolation=input_interpolation or model.interpolation,
                input_scale=trained_input_scale(model.data, str(model.path)),
                trained_factors=list(model.factors) if model.factors is not None else None,
            )
        )
    seen: dict[str, int] = {}
    for m in out:  # make names unique
        if m.name in seen or m.name in BASELINES:
            seen[m.name] = seen.get(m.name, 1) + 1
            m.name = f"{m.name}#{seen[m.name]}"
        else:
            seen[m.name] = 1
    return out


def baseline_names(methods: Sequence[str]) -> list[str]:
    """Canonical baseline names (``linear`` -> ``trilinear``, ...); unknown names are an error."""
    out = []
    for m in methods:
        name = BASELINE_ALIASES.get(str(m), str(m))
        if name not in BASELINES:
            raise ValueError(f"methods: unknown method {m!r}; choose from {sorted(BASELINES)} (checkpoints go in ckpts=)")
        if name not in out:
            out.append(name)
    return out


# ---------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """Everything :func:`evaluate` measured."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (subject, method)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # reference metrics
    perceptual: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    segmentation: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    statements: list[str] = field(default_factory=list)
    panels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def means(self) -> dict[str, dict[str, float]]:
        """``{method: {"psnr", "ssim", "nrmse"}}`` of the means over subjects."""
        return {m: {k: s[k] for k in ("psnr", "ssim", "nrmse")} for m, s in self.summary.items()}


def evaluate(
    references: Iterable[Reference],
    methods: Sequence[str] = ("nearest", "trilinear", "tricubic", "zero_filled"),
    checkpoints: Sequence[CheckpointMethod] = (),
    *,
    factors: Sequence[float] = (2, 2, 1),
    options: InferenceOptions | None = None,
    perceptual: Sequence[str] = ("niqe", "piqe", "ma", "pi"),
    segmentation: bool = True,
    panel_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    data_consistency: bool = False,
) -> EvalResult:
    """Score every method on every reference (see the module docstring).

    Args:
        references: HR subjects (:func:`references_from_files`, :func:`references_from_source`).
        methods: interpolation baselines (``nearest``, ``trilinear``, ``tricubic``,
            ``zero_filled``; ``linear``/``cubic`` accepted).
        checkpoints: generators (:func:`checkpoint_methods`).
        factors: k-space reduction per axis; metrics use slices across the most degraded plane.
        options: :class:`~mdcsrn_lightning.inference.options.InferenceOptions` for the generators.
        perceptual: no-reference metrics to report; those that cannot run are stated.
        segmentation: compute the stand-in segmentation consistency.
        panel_dir: write ``<panel_dir>/<subject>.png`` per subject (``None``: no panels).
        log: called with one progress line per subject and method.
        data_consistency: put each checkpoint's LR input's measured k-space band back into
            its output (the LR made with the checkpoint's ``input_interpolation``).
    """
    from mdcsrn_lightning.inference.build import build_inferer  # lazily: the inferers load TorchIO

    options = options or InferenceOptions()
    names = baseline_names(methods)
    if not names and not checkpoints:
        raise ValueError("nothing to evaluate: give methods=[...] and/or ckpts=[...]")
    plan = _EvalPlan(
        names=names, checkpoints=list(checkpoints), factors=[float(f) for f in factors],
        perceptual=[p.lower() for p in perceptual], segmentation=bool(segmentation),
        data_consistency=bool(data_consistency), panel_dir=panel_dir, say=log or (lambda _msg: None),
        inferers={c.name: build_inferer(c.net, options) for c in checkpoints},  # engines built once
    )
    result = EvalResult(settings=_eval_settings(plan, options), statements=_factor_statements(plan))
    start = time.perf_counter()
    result.settings["n_subjects"] = _score_subjects(plan, references, result)
    _summarise(plan, result)
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _EvalPlan:
    """What every subject of one :func:`evaluate` call shares."""

    names: list[str]
    checkpoints: list[CheckpointMethod]
    factors: list[float]
    perceptual: list[str]
    segmentation: bool
    data_consistency: bool
    panel_dir: str | os.PathLike[str] | None
    say: Callable[[str], None]
    inferers: dict[str, Any]

    @property
    def axis(self) -> int:
        return slice_axis(self.factors)

    @property
    def methods(self) -> list[str]:
        return [*self.names, *(c.name for c in self.checkpoints)]


def _eval_settings(plan: _EvalPlan, options: InferenceOptions) -> dict[str, Any]:
    return {
        "factors": plan.factors,
        "slice_axis": plan.axis,
        "methods": plan.names,
        "checkpoints": {c.name: {"path": c.path, "input_interpolation": c.input_interpolation} for c in plan.checkpoints},
        "perceptual": plan.perceptual,
        "segmentation": plan.segmentation,
        "data_consistency": plan.data_consistency,
        "patches": options.kwargs(),
    }


def _factor_statements(plan: _EvalPlan) -> list[str]:
    """A statement for each checkpoint evaluated at factors other than its training ones."""
    return [f"{c.name}: trained with factors {c.trained_factors} but evaluated at {plan.factors}."
            for c in plan.checkpoints
            if c.trained_factors is not None and [float(f) for f in c.trained_factors] != plan.factors]


def _score_subjects(plan: _EvalPlan, references: Iterable[Reference], result: EvalResult) -> int:
    """Every reference scored in turn (:func:`_score_subject`); returns how many there were."""
    n_refs = 0
    for ref in _slice_checked(references, plan.axis):
        n_refs += 1
        _score_subject(plan, ref, result)
    if n_refs == 0:
        raise ValueError("no reference volumes to evaluate")
    return n_refs


def _score_subject(plan: _EvalPlan, ref: Reference, result: EvalResult) -> None:
    """Every method on one reference: rows with reference metrics, then no-reference metrics,
    segmentation consistency and the panel."""
    hr = np.asarray(ref.hr, dtype=np.float32)
    # one intensity scale for every method's metrics, perceptual scores and panels
    unit = ref.scale if ref.scale is not None else reference_scale(hr)
    outputs = _method_outputs(plan, ref, hr, unit, result)
    hr_unit = scale_to_unit(hr, hr, scale=unit)
    perc_rows = _perceptual_rows(plan, ref.name, outputs, hr, hr_unit, unit, result) if plan.perceptual else {}
    tissue = TissueModel.fit(hr) if plan.segmentation else None
    hr_seg = tissue.segment(hr) if tissue is not None else None
    for row in result.rows[-len(outputs) :]:
        row.update({k: v for k, v in perc_rows.get(row["method"], {}).items()})
        if hr_seg is not None:
            row.update(segmentation_consistency(outputs[row["method"]], hr, model=tissue, hr_segmentation=hr_seg))
    if plan.perceptual:
        result.rows.append({"subject": ref.name, "method": HR_NAME, "kind": "reference", **perc_rows[HR_NAME]})
    if plan.panel_dir is not None:
        axis = plan.axis
        path = Path(plan.panel_dir) / f"{safe_name(ref.name, 'subject')}.png"
        images = {n: middle_slice(scale_to_unit(v, hr, scale=unit), axis) for n, v in outputs.items()}
        images[HR_NAME] = middle_slice(hr_unit, axis)
        save_panel(path, images, reference=HR_NAME, error_row=True, title=f"{ref.name} (slice {hr.shape[axis] // 2} along axis {axis})")
        result.panels.append(str(path))


def _method_outputs(plan: _EvalPlan, ref: Reference, hr: np.ndarray, unit: float, result: EvalResult) -> dict[str, np.ndarray]:
    """``{method: SR volume}`` of one reference; one row with the reference metrics per method."""
    from mdcsrn_lightning.inference.base import predict_volume

    lr_cache: dict[str, np.ndarray] = {}

    def lr_for(interp: str) -> np.ndarray:
        if interp not in lr_cache:
            lr_cache[interp] = ref.degraded(plan.factors, interp)
        return lr_cache[interp]

    outputs: dict[str, np.ndarray] = {}
    for name in plan.methods:
        t0 = time.perf_counter()
        if name in BASELINES:
            sr, kind = lr_for(BASELINES[name]), "interpolation"
        else:
            c = next(c for c in plan.checkpoints if c.name == name)
            lr = ref.lr if ref.lr is not None else lr_for(c.input_interpolation)
            # The network's rule: the LR's own scale (ref.scale is the metrics' alone).
            scale = 1.0 if c.input_scale == "none" else input_scale(lr, ref.location or ref.name)
            sr, kind = predict_volume(plan.inferers[name], lr, scale=scale), "checkpoint"
            if plan.data_consistency:
                sr = apply_data_consistency(sr, lr, plan.factors, c.input_interpolation)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"subject": ref.name, "method": name, "kind": kind, "seconds": seconds}
        row.update(slice_metrics(sr, hr, axis=plan.axis, scale=unit))
        result.rows.append(row)
        outputs[name] = sr
        plan.say(f"{ref.name}  {name:<20s} PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  ({seconds:.1f} s)")
    return outputs


def _perceptual_rows(plan: _EvalPlan, subject: str, outputs: Mapping[str, np.ndarray], hr: np.ndarray,
                     hr_unit: np.ndarray, unit: float, result: EvalResult) -> dict[str, dict[str, Any]]:
    """No-reference metrics of every output and of the HR ("Original Resolution" in the paper)."""
    perc_slices = foreground_slices(hr_unit, axis=plan.axis, min_fg_fraction=PERCEPTUAL_FOREGROUND)
    rows: dict[str, dict[str, Any]] = {}
    # one scaled volume at a time (a generator, not a list: they are float64 copies)
    scaled = ((n, scale_to_unit(v, hr, scale=unit)) for n, v in outputs.items())
    for name, vol_unit in itertools.chain(scaled, [(HR_NAME, hr_unit)]):
        pr = perceptual_scores(vol_unit, perc_slices, axis=plan.axis, metrics=plan.perceptual)
        rows[name] = {**pr.scores, "perceptual_slices": pr.n_slices}
        for text in pr.problems.values():
            if text not in result.statements:
                result.statements.append(text)
        for metric, n in pr.skipped.items():
            result.statements.append(
                f"{metric.upper()}: {n} of {pr.n_slices} slices of {subject} / {name} could not be scored and were left out."
            )
    return rows


def _summarise(plan: _EvalPlan, result: EvalResult) -> None:
    """Means and spreads over subjects: reference metrics, seconds, perceptual, segmentation."""
    method_rows = {name: [r for r in result.rows if r["method"] == name] for name in plan.methods}
    result.summary = summarise_methods(method_rows)
    for name, rows in method_rows.items():
        sec = mean_std(rows, "seconds", missing_ok=True)
        if sec is not None:
            result.summary[name]["seconds"] = sec[0]
    if plan.perceptual:
        for name in [*method_rows, HR_NAME]:
            rows = [r for r in result.rows if r["method"] == name]
            result.perceptual[name] = summarise_perceptual([{k: r[k] for k in plan.perceptual if k in r} for r in rows])
    if plan.segmentation:
        keys = ["dice", "jaccard", *(f"dice_{c}" for c in CLASS_NAMES), *(f"jaccard_{c}" for c in CLASS_NAMES)]
        for name, rows in method_rows.items():
            result.segmentation[name] = {k: v for k in keys if (v := mean_std(rows, k, missing_ok=True)) is not None}


# ---------------------------------------------------------------------- reports
def markdown_report(result: EvalResult) -> str:
    """The three tables (reference, perceptual, segmentation) and the statements, as markdown."""
    n = result.settings.get("n_subjects", 0)
    axis = result.settings.get("slice_axis", 2)
    lines = [
        f"### Reference metrics: slice-wise across the degraded plane (slices along axis {axis}), "
        f"mean ± std over {n} subject(s)",
        "",
        markdown_table(result.summary),
    ]
    if result.perceptual:
        wanted = result.settings.get("perceptual", [])
        lines += [
            "",
            f"### No-reference perceptual metrics (lower is better): slices with > "
            f"{PERCEPTUAL_FOREGROUND:.0%} foreground, mean ± std over subjects",
            "",
            "| method | " + " | ".join(m.upper() for m in wanted) + " |",
            "|---" * (len(wanted) + 1) + "|",
        ]
        for name, stats in result.perceptual.items():
            cells = [format_mean_std(stats.get(m), 2) if m in stats else "not computed" for m in wanted]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.segmentation:
        cols = ["dice", "jaccard", *(f"dice_{c}" for c in CLASS_NAMES)]
        lines += [
            "",
            f"### Segmentation consistency with the HR - {STAND_IN_LABEL}",
            "",
            "| method | Dice | Jaccard | " + " | ".join(f"Dice {c.upper()}" for c in CLASS_NAMES) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for name, stats in result.segmentation.items():
            lines.append(f"| {name} | " + " | ".join(format_mean_std(stats.get(c), 4) for c in cols) + " |")
    if result.statements:
        lines += ["", "Notes:"] + [f"- {s}" for s in result.statements]
    return "\n".join(lines)


def summary_rows(result: EvalResult) -> list[dict[str, Any]]:
    """One flat row per method: ``<metric>`` (mean) and ``<metric>_std`` for every metric."""
    rows = []
    for name in [*result.summary, *(k for k in result.perceptual if k not in result.summary)]:
        row: dict[str, Any] = {"method": name}
        row.update(result.summary.get(name, {}))
        for group in (result.perceptual.get(name, {}), result.segmentation.get(name, {})):
            for k, (mean, std) in group.items():
                row[k], row[f"{k}_std"] = mean, std
        rows.append(row)
    return rows


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_outputs(result: EvalResult, output_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``report.md``, ``per_subject.csv``, ``summary.csv`` and ``results.json``; returns their paths."""
    out = Path(output_dir)
    paths = {
        "report": out / "report.md",
        "per_subject_csv": out / "per_subject.csv",
        "summary_csv": out / "summary.csv",
        "json": out / "results.json",
    }
    write_text(paths["report"], markdown_report(result) + "\n")
    write_text(paths["per_subject_csv"], csv_text(result.rows))
    write_text(paths["summary_csv"], csv_text(summary_rows(result)))
    payload = {
        "means": result.means(),
        "summary": result.summary,
        "perceptual": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in result.perceptual.items()},
        "segmentation": {
            "label": STAND_IN_LABEL,
            "methods": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in result.segmentation.items()},
        },
        "perceptual_availability": available_metrics(),
        "statements": result.statements,
        "per_subject": result.rows,
        "panels": result.panels,
        "settings": result.settings,
        "seconds": result.seconds,
    }
    write_text(paths["json"], json.dumps(jsonable(payload), indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}
