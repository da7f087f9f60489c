"""The package's layers import downwards only (read from the source with `ast`).

    cli -> benchmark -> training -> evaluation -> inference -> checkpoints -> models
                                                           \\-> data

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mdcsrn_lightning

PACKAGE = Path(mdcsrn_lightning.__file__).parent

# layer -> the layers (of this package) and the libraries it must never import
FORBIDDEN: dict[str, set[str]] = {
    "models": {"data", "checkpoints", "inference", "evaluation", "training", "benchmark", "cli", "config",
               "lightning", "hydra", "omegaconf", "nibabel", "torchio"},
    "checkpoints": {"data", "inference", "evaluation", "training", "benchmark", "cli", "hydra"},
    "data": {"models", "checkpoints", "inference", "evaluation", "training", "benchmark", "cli"},
    "inference": {"evaluation", "training", "benchmark", "cli"},
    "evaluation": {"training", "benchmark", "cli"},
    "training": {"benchmark", "cli"},
    "benchmark": {"cli"},
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py")


def _module(path: Path) -> str:
    return ".".join(("mdcsrn_lightning", *path.relative_to(PACKAGE).with_suffix("").parts))


def _imported(source: str, module: str) -> set[str]:
    """First component under ``mdcsrn_lightning`` (or the top-level library) of each import
    in ``source``, the text of ``module`` (``mdcsrn_lightning.x.y``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join([*module.split(".")[: -node.level], *([base] if base else [])])
            # `from mdcsrn_lightning import training` imports the layer named in the list
            names = [f"{base}.{a.name}" for a in node.names] if base == "mdcsrn_lightning" else [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.add(parts[1] if parts[0] == "mdcsrn_lightning" and len(parts) > 1 else parts[0])
    return found


def _imports(path: Path) -> set[str]:
    return _imported(path.read_text(), _module(path))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        graph.setdefault(layer, set()).update(_imports(path) - {layer})
    return graph


GRAPH = _graph()


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer: str) -> None:
    offending = {
        str(path.relative_to(PACKAGE)): sorted(_imports(path) & FORBIDDEN[layer])
        for path in PACKAGE.rglob("*.py")
        if _layer(path) == layer and _imports(path) & FORBIDDEN[layer]
    }
    assert not offending, f"{layer} imports what it must not: {offending}"


def test_no_import_cycle_between_layers() -> None:
    ours = {k: {d for d in v if d in GRAPH} for k, v in GRAPH.items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(node):], node])}"
        visiting.append(node)
        for dep in sorted(ours[node]):
            visit(dep)
        visiting.pop()
        done.add(node)

    for node in sorted(ours):
        visit(node)


def test_the_checker_sees_every_kind_of_import() -> None:
    source = """
import lightning.pytorch as pl
import mdcsrn_lightning.data.split
from mdcsrn_lightning import training
from mdcsrn_lightning.evaluation.metrics import psnr
from . import streaming
from ..checkpoints import read_checkpoint

def f():
    from mdcsrn_lightning.cli import infer
"""
    found = _imported(source, "mdcsrn_lightning.inference.patches")
    assert found == {"lightning", "data", "training", "evaluation", "inference", "checkpoints", "cli"}
    # and on the package itself
    assert {"models", "atomic"} <= GRAPH["checkpoints"]
    assert "models" in GRAPH["inference"] and "data" in GRAPH["inference"]
    assert {"evaluation", "checkpoints"} <= GRAPH["training"]
    assert "training" in GRAPH["benchmark"]  # only lazily, inside a function
