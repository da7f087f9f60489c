"""How a volume is super-resolved: one typed options object, read by :func:`.build.build_inferer`.

Pure Python: no torch, files or configuration system here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

__all__ = ["BNMode", "EngineName", "InferenceOptions", "OverlapMode"]

EngineName = Literal["torch", "compile", "onnxruntime", "openvino", "auto"]
OverlapMode = Literal["crop", "average", "hann"]
BNMode = Literal["eval", "train"]
# the fields that choose the inferer; the others are the patch pass's own
_CHOICE_FIELDS = ("engine", "stream", "slab")


@dataclass
class InferenceOptions:
    """The one options object of inference (``mdcsrn-infer``, ``mdcsrn-eval``, the benchmarks).

    Patch pass (:func:`.patches.super_resolve`): ``patch_size`` and ``margin`` (one int,
    three, or ``"auto"``), ``overlap_mode``, ``batch_size``, ``bn_mode`` (``train``: batch
    statistics, torch only), ``device`` (``auto``, ``cpu``, ``cuda:1``...), ``precision``
    (``32`` or ``bf16``), ``progress``. ``engine``: what runs the network (:mod:`.engines`).
    ``stream=True`` replaces the patches by the exact whole-volume pass, ``slab`` slices at a
    time (``None``: 16); :func:`.build.build_inferer` says which pass runs on which engine.
    """

    patch_size: int | Sequence[int] | str = 70
    margin: int | Sequence[int] | str = 3
    overlap_mode: OverlapMode = "crop"
    batch_size: int = 1
    bn_mode: BNMode = "eval"
    device: str = "auto"
    precision: str = "32"
    progress: bool = False
    engine: EngineName = "torch"
    stream: bool = False
    slab: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in get_args(EngineName):
            raise ValueError(f"engine must be one of {get_args(EngineName)}, got {self.engine!r}")
        if self.slab is not None and (isinstance(self.slab, bool) or not isinstance(self.slab, int) or self.slab < 1):
            raise ValueError(f"slab: an integer >= 1 or None, got {self.slab!r}")

    def kwargs(self) -> dict[str, Any]:
        """The :func:`.patches.super_resolve` keyword arguments."""
        out = asdict(self)
        for key in _CHOICE_FIELDS:
            out.pop(key)
        return out
