"""How a volume is super-resolved: one typed, checked options object, read by
:func:`.build.build_inferer` (the strategies and engines: ``docs/inference.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from mdcsrn_lightning.sizes import triple

__all__ = ["ADAPT_DEFAULTS", "ADAPT_ORDERS", "PRECISIONS", "AdaptNetwork", "AdaptOptions", "BNMode", "EngineName", "InferenceOptions", "OverlapMode"]

EngineName = Literal["torch", "compile", "onnxruntime", "openvino", "auto"]
OverlapMode = Literal["crop", "average", "hann"]
BNMode = Literal["eval", "train"]
PRECISIONS = ("32", "fp32", "float32", "bf16", "bfloat16", "bf16-mixed")
#: how the adapted model is applied: each degraded axis in turn swapped into the
#: full-resolution axis's slot, axis 0 first ("01"), axis 1 first ("10"), or both orders averaged
ADAPT_ORDERS = ("01", "10", "average")


def _positive(value: object, name: str, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise ValueError(f"adapt.{name}: a {'number' if kind is float else 'integer'} > 0, got {value!r}")


#: the network ``adapt=true`` trains: ``checkpoint`` fine-tunes the given 3D generator; ``planes``
#: trains a fresh 2D network on the scan's own planes (:mod:`.plane_data`); ``auto``: ``planes``
#: (``checkpoint`` when ``adapt.save`` is given)
AdaptNetwork = Literal["auto", "checkpoint", "planes"]
#: what ``None`` settings of :class:`AdaptOptions` become for each network (measured in
#: ``docs/inference.md``: the 2D network takes larger batches, a higher rate and many more steps;
#: its ``patch`` and ``epochs`` are fitted to the scan, :func:`~.plane_data.fitted`)
ADAPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "checkpoint": {"steps": 300, "lr": 1e-4, "patch": 24, "batch": 4, "validate_every": 20, "patience": 5},
    "planes": {"steps": 1_000_000, "lr": 5e-4, "batch": 16, "validate_every": 100, "patience": 30},
}


@dataclass
class AdaptOptions:
    """Per-scan self-supervised fine-tuning before inference (``adapt=true``;
    :class:`~.adapt.AdaptingInferer`, :class:`~.planes.PlaneAdaptingInferer`,
    ``docs/inference.md`` "Adapting to a scan").

    ``network``: :data:`AdaptNetwork`. ``steps``: at most this many Adam steps (learning rate
    ``lr``), at most ``epochs`` passes over the training voxels (``None``: no limit; a small scan
    is otherwise memorised, :func:`~.adapt.epoch_capped`), and at most ``minutes`` (``None``: no
    time limit); ``patch``: the edge of the random
    training patches, ``batch`` of them per step; ``seed``: their positions and flips; ``holdout``:
    the fraction of the scan (a slab along axis 0, or for ``planes`` along the first degraded
    axis, on the anatomy: :func:`~.holdout.holdout_slab`) held out for self-validation every ``validate_every``
    steps, stopping after ``patience`` validations without improvement; ``order``:
    :data:`ADAPT_ORDERS`; ``save``: write the adapted checkpoint there; ``flips``: the plane
    network's output on each plane averaged over the plane's 4 flips (4 passes of a cheap network;
    :data:`~.plane_data.FLIPS`); ``rotations``: the plane network's pairs also from that many
    copies of the scan turned in the training plane (``None``: 5 where both its axes are sharp,
    as for thick slices, else 0, :data:`~.plane_data.PLANE_ROTATIONS`; the 5 cut to what half the
    free memory holds, :func:`~.plane_data.rotations_that_fit`); ``noise``: noise added to
    the plane network's pair inputs so that theirs matches the scan's (``None``: on where both
    axes of its training planes are sharp, else off; :mod:`~.plane_noise`); ``prior``: the plane
    network starts from the released prior trained across scans instead of from scratch
    (``None``: the prior where both axes of its training planes are sharp, else from scratch;
    :mod:`~.plane_prior`). ``steps``, ``lr``,
    ``patch``, ``batch``, ``validate_every``, ``patience``, ``epochs`` left ``None`` take the network's
    :data:`ADAPT_DEFAULTS` (:meth:`resolved`; the plane network's ``patch``: the largest square
    up to 48 its training planes hold; its ``epochs``: 200 where its pairs restore one axis only,
    as for 2x2x1). ``factors`` and ``interpolation``: the
    checkpoint's (filled by the file layer; which axis is at full resolution, how pairs are made).
    A thick-slice checkpoint: ``slice_factor`` (fine voxels per slice of the scan: the pairs'
    slice thickness and spacing), ``slice_profile`` and ``slice_axis`` (the network's thick
    axis), filled by the file layer; ``slice_factor=None`` means a k-space checkpoint.
    """

    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = 5.0
    lr: float | None = None
    patch: int | None = None
    batch: int | None = None
    seed: int = 0
    holdout: float = 0.2
    validate_every: int | None = None
    patience: int | None = None
    order: str = "average"
    save: str | None = None
    network: str = "auto"
    flips: bool = True
    rotations: int | None = None
    noise: bool | None = None
    prior: bool | None = None
    factors: tuple[float, float, float] = (2.0, 2.0, 1.0)
    interpolation: str = "linear"
    slice_factor: int | None = None
    slice_profile: str = "boxcar"
    slice_axis: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "patch", "batch", "validate_every", "patience"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name)
        if self.lr is not None:
            _positive(self.lr, "lr", float)
        for name in ("minutes", "epochs"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name, float)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"adapt.seed: an integer, got {self.seed!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise ValueError(f"adapt.holdout: a fraction in (0, 1), got {self.holdout!r}")
        if str(self.order) not in ADAPT_ORDERS:
            raise ValueError(f"adapt.order must be one of {ADAPT_ORDERS}, got {self.order!r}")
        if self.rotations is not None and (isinstance(self.rotations, bool) or not isinstance(self.rotations, int)
                                           or self.rotations < 0):
            raise ValueError(f"adapt.rotations: an integer >= 0, got {self.rotations!r}")
        if not isinstance(self.flips, bool):
            raise ValueError(f"adapt.flips: true or false, got {self.flips!r}")
        for name in ("noise", "prior"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"adapt.{name}: true, false or null, got {getattr(self, name)!r}")
        if str(self.network) not in get_args(AdaptNetwork):
            raise ValueError(f"adapt.network must be one of {get_args(AdaptNetwork)}, got {self.network!r}")
        self.factors = tuple(float(f) for f in self.factors)  # type: ignore[assignment]
        if self.slice_factor is not None:
            _positive(self.slice_factor, "slice_factor")
        if self.slice_axis not in (0, 1, 2) or isinstance(self.slice_axis, bool):
            raise ValueError(f"adapt.slice_axis must be 0, 1 or 2, got {self.slice_axis!r}")

    def resolved(self, network: str | None = None) -> AdaptOptions:
        """A copy for ``network`` (default: :attr:`network`; ``auto``: ``planes``, or
        ``checkpoint`` with ``save``, as only a checkpoint can be saved) with every ``None``
        setting in :data:`ADAPT_DEFAULTS` filled from it."""
        chosen = str(network or self.network)
        if chosen == "auto":
            chosen = "checkpoint" if self.save is not None else "planes"
        filled = {k: v for k, v in ADAPT_DEFAULTS[chosen].items() if getattr(self, k) is None}
        return replace(self, network=chosen, **filled)


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
    ``adapt``: fine-tune a copy of the network on each volume first (:class:`AdaptOptions`).
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
    adapt: AdaptOptions | None = None

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
        if self.adapt is not None and not isinstance(self.adapt, AdaptOptions):
            raise ValueError(f"adapt: an AdaptOptions or None, got {type(self.adapt).__name__}")

    def kwargs(self) -> dict[str, Any]:
        """The patch pass's own fields (for records such as ``mdcsrn-eval``'s settings)."""
        return {k: v for k, v in asdict(self).items() if k not in ("engine", "stream", "slab", "uncertainty", "adapt")}
