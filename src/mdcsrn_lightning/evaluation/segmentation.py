"""Segmentation consistency (paper Table 3) with an offline **stand-in** segmenter.

The paper segmented SR and HR volumes with a pretrained HighRes3DNet (159 structures,
after resampling to 1 mm and N4 bias correction) and reported Dice and Jaccard between the
two segmentations. Those weights cannot be downloaded here, so this module uses a small,
deterministic tissue segmentation instead and reports the same two overlap scores. It
measures the same thing - does the SR change what an automatic pipeline would segment? -
but with 3 tissue classes, not 159 structures: **its numbers are not comparable with the
paper's Table 3**, and every report labels them as coming from this stand-in.

The stand-in is one fixed segmenter per subject, as a pretrained network is one fixed
function: its parameters are fitted once on the HR and then applied unchanged to the HR
and to every method's output (:class:`TissueModel`). (Refitting on each output would let
the class boundaries move with the output and make the scores jump between methods.)

* fit on the HR: intensity scale = the HR's 99.9th percentile; class centres = 1D
  k-means (:func:`kmeans_1d`: two fixed starts, no randomness) of the HR intensities
  inside its brain mask; classes ordered by intensity: for T1 contrast CSF < GM < WM;
* apply to a volume: divide by the HR's scale; brain (head) mask = above 10 % of it
  (CSF included; a histogram threshold such as Otsu's falls between CSF and GM on
  skull-stripped T1), one binary opening (6-connected), the largest connected
  component, holes filled; inside the mask, each voxel gets the class of the nearest
  centre.

It is a *consistency* measure: on an unstripped head the "CSF" class also holds skull
and scalp, and no attempt at anatomy is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "CLASS_NAMES",
    "TissueModel",
    "STAND_IN_LABEL",
    "brain_mask",
    "kmeans_1d",
    "overlap_scores",
    "segment",
    "segmentation_consistency",
]

CLASS_NAMES: tuple[str, ...] = ("csf", "gm", "wm")
MASK_THRESHOLD = 0.1  # of the 99.9th percentile: below it is background
STAND_IN_LABEL = (
    "segmentation consistency by an offline stand-in (threshold brain mask + 3-class intensity "
    "k-means fitted on the HR: CSF/GM/WM), NOT the paper's pretrained HighRes3DNet (159 structures); "
    "not comparable with the paper's Table 3"
)


def _as_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    arr = np.asarray(volume, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 3D (X, Y, Z), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def brain_mask(volume: np.ndarray, threshold: float = MASK_THRESHOLD, scale: float | None = None) -> np.ndarray:
    """``(X, Y, Z)`` bool: above ``threshold * scale``, one opening, largest component, holes filled.

    ``scale`` defaults to the volume's own 99.9th percentile.
    """
    vol = _as_volume(volume)
    if scale is None:
        scale = float(np.percentile(vol, 99.9))
    mask = vol > threshold * scale if scale > 0 else np.zeros(vol.shape, dtype=bool)
    mask = ndi.binary_opening(mask, structure=ndi.generate_binary_structure(3, 1))
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    return ndi.binary_fill_holes(mask)


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Lloyd iterations in 1D from ``centres``: ``(sorted centres, within-cluster sum of squares)``."""
    k = len(centres)
    centres = np.sort(centres)
    for _ in range(max_iter):
        labels = np.searchsorted((centres[:-1] + centres[1:]) / 2.0, x)
        sums = np.bincount(labels, weights=x, minlength=k)
        counts = np.bincount(labels, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
        if np.allclose(new, centres, rtol=0.0, atol=1e-12):
            centres = new
            break
        centres = new
    labels = np.searchsorted((centres[:-1] + centres[1:]) / 2.0, x)
    return centres, float(np.sum((x - centres[labels]) ** 2))


def kmeans_1d(values: np.ndarray, k: int = 3, max_iter: int = 100) -> np.ndarray:
    """Sorted cluster centres of a 1D sample; deterministic (no random initialisation).

    Two starts, the better (lower within-cluster sum of squares) wins: centres evenly
    spread over the 1st-99th percentile range, and the ``(2i + 1) / 2k`` quantiles (the
    first copes with classes of very different sizes, the second with skewed ranges).
    Lloyd iterations assign each value to the nearest centre until no centre moves.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < k:
        raise ValueError(f"k-means with k={k} needs at least {k} values, got {x.size}")
    lo, hi = np.percentile(x, [1.0, 99.0])
    starts = [
        lo + (hi - lo) * (2 * np.arange(k) + 1) / (2.0 * k),
        np.quantile(x, (2 * np.arange(k) + 1) / (2.0 * k)),
    ]
    fits = [_lloyd(x, c, max_iter) for c in starts]
    return min(fits, key=lambda f: f[1])[0]


@dataclass(frozen=True)
class TissueModel:
    """A fitted stand-in segmenter: HR intensity scale and sorted class centres (on that scale)."""

    scale: float
    centres: tuple[float, ...]
    mask_threshold: float = MASK_THRESHOLD

    @classmethod
    def fit(cls, reference: np.ndarray, num_classes: int = 3, mask_threshold: float = MASK_THRESHOLD) -> TissueModel:
        """Fit on a reference (the HR): its 99.9th percentile and k-means centres inside its mask."""
        ref = _as_volume(reference, "reference")
        scale = float(np.percentile(ref, 99.9))
        if not scale > 0:
            raise ValueError(f"cannot segment a volume whose 99.9th percentile is {scale:g}")
        unit = ref / scale
        inside = unit[brain_mask(unit, mask_threshold, scale=1.0)]
        if inside.size < num_classes:
            raise ValueError(f"the brain mask holds {inside.size} voxels; too few for {num_classes} classes")
        return cls(scale=scale, centres=tuple(float(c) for c in kmeans_1d(inside, num_classes)), mask_threshold=mask_threshold)

    def segment(self, volume: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` -> uint8 labels: 0 background, 1..k by increasing intensity."""
        unit = _as_volume(volume) / self.scale
        mask = brain_mask(unit, self.mask_threshold, scale=1.0)
        centres = np.asarray(self.centres)
        out = np.zeros(unit.shape, dtype=np.uint8)
        out[mask] = (np.searchsorted((centres[:-1] + centres[1:]) / 2.0, unit[mask]) + 1).astype(np.uint8)
        return out


def segment(volume: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """Segment a volume with a :class:`TissueModel` fitted on itself.

    ``(X, Y, Z)`` -> ``(X, Y, Z)`` uint8: 0 background, 1..k by increasing intensity
    (T1, k = 3: 1 CSF, 2 GM, 3 WM; :data:`CLASS_NAMES`).
    """
    return TissueModel.fit(volume, num_classes).segment(volume)


def overlap_scores(
    seg_a: np.ndarray, seg_b: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, float]:
    """Dice and Jaccard of labels ``1..k`` between two label volumes, per class and mean.

    Keys ``dice_<class>``, ``jaccard_<class>``, ``dice`` and ``jaccard`` (the means over
    classes; background excluded). A class absent from both counts as perfect agreement.
    """
    a, b = np.asarray(seg_a), np.asarray(seg_b)
    if a.shape != b.shape:
        raise ValueError(f"segmentations differ in shape: {a.shape} vs {b.shape}")
    out: dict[str, float] = {}
    dices, jaccards = [], []
    for label, name in enumerate(class_names, start=1):
        x, y = a == label, b == label
        inter = float(np.count_nonzero(x & y))
        total = float(np.count_nonzero(x) + np.count_nonzero(y))
        union = total - inter
        dice = 1.0 if total == 0 else 2.0 * inter / total
        jac = 1.0 if union == 0 else inter / union
        out[f"dice_{name}"], out[f"jaccard_{name}"] = dice, jac
        dices.append(dice)
        jaccards.append(jac)
    out["dice"] = float(np.mean(dices))
    out["jaccard"] = float(np.mean(jaccards))
    return out


def segmentation_consistency(
    sr: np.ndarray,
    hr: np.ndarray,
    *,
    model: TissueModel | None = None,
    hr_segmentation: np.ndarray | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict[str, float]:
    """Segment SR and HR with one :class:`TissueModel` fitted on the HR; compare (:func:`overlap_scores`).

    Pass ``model`` and ``hr_segmentation`` (``model.segment(hr)``) to reuse them across methods.
    """
    sr_arr, hr_arr = _as_volume(sr, "sr"), _as_volume(hr, "hr")
    if sr_arr.shape != hr_arr.shape:
        raise ValueError(f"sr and hr differ in shape: {sr_arr.shape} vs {hr_arr.shape}")
    model = model or TissueModel.fit(hr_arr, len(class_names))
    ref = model.segment(hr_arr) if hr_segmentation is None else hr_segmentation
    return overlap_scores(model.segment(sr_arr), ref, class_names)
