"""The generators a checkpoint may name: the allow-list for rebuilding one from a file.

A checkpoint stores its generator as ``net_config`` (``_target_`` plus keyword arguments).
Only the classes listed here can be built from it: a file that names any other callable
(``os.system``, ``builtins.eval``...) is refused before anything is imported or called.
"""

from __future__ import annotations

from torch import nn

from mdcsrn_lightning.models.baselines import FSRCNN3D, SRDenseNet3D, SRResNet3D
from mdcsrn_lightning.models.mdcsrn import MDCSRN
from mdcsrn_lightning.models.reference import ReferenceMDCSRN

_CLASSES: tuple[type[nn.Module], ...] = (MDCSRN, ReferenceMDCSRN, FSRCNN3D, SRDenseNet3D, SRResNet3D)


def _names(cls: type[nn.Module]) -> tuple[str, ...]:
    # the defining module's path (what the configs use) and the package's re-export
    return (f"{cls.__module__}.{cls.__qualname__}", f"mdcsrn_lightning.models.{cls.__qualname__}")


#: ``_target_`` string -> generator class; nothing outside this mapping is ever built.
GENERATORS: dict[str, type[nn.Module]] = {name: cls for cls in _CLASSES for name in _names(cls)}


def generator_class(target: object) -> type[nn.Module]:
    """The allow-listed class for a ``_target_`` string; ``ValueError`` for anything else."""
    if not isinstance(target, str) or target not in GENERATORS:
        allowed = sorted({f"{c.__module__}.{c.__qualname__}" for c in GENERATORS.values()})
        raise ValueError(f"_target_ {target!r} is not one of our generators ({', '.join(allowed)})")
    return GENERATORS[target]
