"""How a volume is super-resolved: one typed, checked options object, read by
:func:`.build.build_inferer` (the strategies and engines: ``docs/inference.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from mdcsrn_lightning.sizes import triple

__all__ = ["BNMode", "EngineName", "InferenceOptions", "OverlapMode", "PRECISIONS"]

EngineName = Literal["torch", "compile", "onnxruntime", "openvino", "auto"]
OverlapMode = Literal["crop", "average", "hann"]
BNMode = Literal["eval", "train"]
PRECISIONS = ("32", "fp32", "float32", "bf16", "bfloat16", "bf16-mixed")


def _check_size(value: object, name: str, minimum: int) -> None:
    if not (isinstance(value, str) and value == "auto"):
        triple(value, name, minimum)  # type: ignore[arg-type]


@dataclass
class InferenceOptions:
    """The one options object of inference (``mdcsrn-infer``, ``mdcsrn-eval``, the benchmarks).

    Patches: ``patch_size`` (one int, three, or ``"auto"``: from free memory), ``margin``
    (one int, three, or ``"auto"``: the receptive field radius, exact), ``overlap_mode``,
    ``batch_size``, ``bn_mode`` (``train``: batch statistics, torch only), ``precision``
    (``32`` or ``bf16``). ``device``: ``auto``, ``cpu``, ``cuda:1``... ``engine``: what runs
    the network. ``stream=True``: the exact whole-volume pass instead of patches, ``slab``
    slices at a time (``None``: 16). ``uncertainty=True``: the chosen inferer is run over the
    symmetries of the degraded plane and averaged (:class:`~.ensemble.EnsembleInferer`: 8
    passes, 4 on a non-square plane), with the per-voxel standard deviation beside the mean.
    """

    patch_size: int | Sequence[int] | str | None = 70
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
    uncertainty: bool = False

    def __post_init__(self) -> None:
        if self.patch_size is None:  # `patches.size: null` in the configs
            self.patch_size = "auto"
        for name, allowed in (("engine", get_args(EngineName)), ("overlap_mode", get_args(OverlapMode)),
                              ("bn_mode", get_args(BNMode)), ("precision", PRECISIONS)):
            if str(getattr(self, name)) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _check_size(self.patch_size, "patch_size", 1)
        _check_size(self.margin, "margin", 0)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.slab is not None and (isinstance(self.slab, bool) or not isinstance(self.slab, int) or self.slab < 1):
            raise ValueError(f"slab: an integer >= 1 or None, got {self.slab!r}")
        if not isinstance(self.uncertainty, bool):
            raise ValueError(f"uncertainty: true or false, got {self.uncertainty!r}")

    def kwargs(self) -> dict[str, Any]:
        """The patch pass's own fields (for records such as ``mdcsrn-eval``'s settings)."""
        return {k: v for k, v in asdict(self).items() if k not in ("engine", "stream", "slab", "uncertainty")}
