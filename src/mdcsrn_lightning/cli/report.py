"""`mdcsrn-report`: the paper's tables and figures from runs and sweeps, offline.

    mdcsrn-report logs/train/multiruns/<time>                 # one sweep (a whole table)
    mdcsrn-report logs/train/multiruns/<t1> logs/train/multiruns/<t2> --out report/
    mdcsrn-report logs/train/runs/<run> <run>/wandb/offline-run-<id>   # a W&B folder: its run
    mdcsrn-report logs/train/multiruns/<time> --html          # and report.html, one self-contained page

Prints one markdown table per W&B group (sweep): the interpolation baselines once, then one
row per run (named by its tags), PSNR / SSIM / NRMSE as mean ± std, #params and seconds
per volume. Writes report.md, report.csv, val_psnr.png (validation PSNR of every run),
val_curves.png (validation PSNR and SSIM), panels.png and panels/<table>__<row>.png (each
run's test slice panel) into --out; with --html also report.html: the tables, curves and
panels in one file with every image embedded (opens offline, no other files needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mdcsrn_lightning.evaluation.report import build_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mdcsrn-report",
        description=(
            "Paper-format tables (markdown, CSV) and figures from mdcsrn-train run folders, "
            "multirun (sweep) folders, or the W&B run folders inside them (read through their run)."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="run or multirun folders (searched recursively)")
    parser.add_argument("--out", default="report", help="output folder (default: ./report)")
    parser.add_argument("--no-figures", action="store_true", help="tables only (no matplotlib)")
    parser.add_argument(
        "--html", action="store_true",
        help="also write report.html: tables, curves and panels in one self-contained file",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args.paths)
        written = report.write(args.out, figures=not args.no_figures, html=args.html)
    except (ValueError, OSError) as exc:  # ReportError is a ValueError; WriteError an OSError
        print(f"mdcsrn-report: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    print(report.markdown(), end="")
    print(f"\nWrote {written['markdown']} and {written['csv']}", end="")
    figures = [str(written[k]) for k in ("html", "val_psnr", "val_curves", "panels") if k in written]
    print(f", {', '.join(figures)}" if figures else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
