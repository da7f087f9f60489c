"""`mdcsrn-eval`: baselines and checkpoints on HR references; the last stdout line is JSON.

    mdcsrn-eval inputs=[a.nii.gz,b.nii.gz] methods=[trilinear,zero_filled]
    mdcsrn-eval inputs=[hr/] ckpts=[run/checkpoints/last.ckpt,gan/checkpoints/best.ckpt]
    mdcsrn-eval data=embedded ckpts=[model.ckpt]

Prints the markdown tables (reference metrics, no-reference metrics with a statement for
each one that cannot be computed, stand-in segmentation consistency), writes them with
CSV/JSON files and slice panels into ``output_dir``, and prints as its last line
``{method: {"psnr": .., "ssim": .., "nrmse": ..}}`` (means over subjects).

A bad request prints one line ``mdcsrn-eval: error: <file>: <problem>`` on stderr and
exits with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mdcsrn_lightning.atomic import WriteError
from mdcsrn_lightning.cli.infer import fail, inference_options, interrupted
from mdcsrn_lightning.cli.overrides import one_line_override_errors
from mdcsrn_lightning.config import config_dir
from mdcsrn_lightning.data.sources import VolumeError
from mdcsrn_lightning.data.volume_io import set_max_voxels
from mdcsrn_lightning.evaluation.evaluate import (
    checkpoint_methods,
    evaluate,
    jsonable,
    markdown_report,
    references_from_files,
    references_from_source,
    write_outputs,
)
from mdcsrn_lightning.data.volume_write import check_writable
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.data.volume_io import collect_inputs
from mdcsrn_lightning.interrupts import Terminated, terminate_as_exception
from mdcsrn_lightning.checkpoints import CheckpointError

PROG = "mdcsrn-eval"


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)


def _references(cfg: DictConfig) -> tuple[Any, list[float], str]:
    """``(references, factors, description)`` from ``data=`` or ``inputs=``."""
    data = cfg.get("data")
    inputs = _list(cfg.get("inputs"))
    if data is not None and inputs:
        raise InferenceError("inputs: give either inputs=[...] or data=<config>, not both")
    if data is not None:
        from hydra.utils import instantiate

        from mdcsrn_lightning.data.split import load_or_create_split

        dm = instantiate(data)
        hp = dm.hparams
        # the training run's split: same forced sets and person groups as SRDataModule.setup
        source = dm.source
        split = load_or_create_split(
            source.subject_ids(), hp.split_fractions, hp.split_seed, hp.split_file,
            source.forced_sets(), source.split_groups(),
        )
        names = split.get(str(cfg.split))
        if names is None:
            raise InferenceError(f"split: unknown set {cfg.split!r}; choose train, val, eval or test")
        if not names:
            raise InferenceError(f"{hp.split_file or 'split'}: the {cfg.split} set is empty")
        factors = _list(cfg.factors) or list(dm.factors)
        return references_from_source(dm.source, names), [float(f) for f in factors], f"{dm.source!r} {cfg.split} set ({len(names)} subjects)"
    if not inputs:
        raise InferenceError("inputs: no references; give inputs=[hr.nii.gz,...] or data=<config>")
    files: list[Path] = []
    for spec in inputs:
        files += collect_inputs(str(spec))[0]
    factors = _list(cfg.factors) or [2.0, 2.0, 1.0]
    return references_from_files(files), [float(f) for f in factors], f"{len(files)} file(s)"


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    set_max_voxels(cfg.get("max_voxels"))
    references, factors, described = _references(cfg)
    checkpoints = checkpoint_methods(
        [str(p) for p in _list(cfg.ckpts)],
        names=[str(n) for n in _list(cfg.get("ckpt_names"))] or None,
        input_interpolation=cfg.get("input_interpolation"),
    )
    output_dir = Path(str(cfg.output_dir))
    check_writable(output_dir / "results.json")  # a read-only folder: refused before computing
    print(f"Evaluating on {described}, factors {factors}", flush=True)
    result = evaluate(
        references,
        [str(m) for m in _list(cfg.methods)],
        checkpoints,
        factors=factors,
        options=inference_options(cfg),
        perceptual=[str(p) for p in _list(cfg.perceptual)],
        segmentation=bool(cfg.segmentation),
        panel_dir=output_dir / "panels" if cfg.panels else None,
        log=lambda line: print(line, flush=True),
        data_consistency=bool(cfg.get("data_consistency", False)),
    )
    print()
    print(markdown_report(result))
    paths = write_outputs(result, output_dir)
    print(f"\nEvaluated in {result.seconds:.1f} s. Files in {output_dir}:")
    for p in [*paths.values(), *result.panels]:
        print(f"  {p}")
    return result.means()


@one_line_override_errors(PROG)
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        with terminate_as_exception():
            means = run_eval(cfg)
    except (InferenceError, VolumeError, CheckpointError) as exc:
        fail(str(exc), PROG)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), PROG)
    except OSError as exc:  # disk full, read-only output folder: one line, no partial file
        fail(str(exc) if isinstance(exc, WriteError) else f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}", PROG)
    except (KeyboardInterrupt, Terminated) as exc:
        interrupted(exc, PROG)
    sys.stdout.flush()
    print(json.dumps(jsonable(means)))


if __name__ == "__main__":
    main()
