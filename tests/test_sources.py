"""Sources: ids, validation messages, and the embedded template's slabs (tiny data only)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.sources import (
    EmbeddedMNI152Source,
    GlobSource,
    VolumeError,
    check_patch_fits,
    load_volume,
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _vol(seed: int = 0, shape: tuple[int, ...] = (24, 24, 24)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 100).astype(np.float32)


# ----------------------------------------------------------------------------- GlobSource
def test_hcp_layout_ids_are_subject_folders(tmp_path: Path) -> None:
    for sid in ("100307", "100408"):
        _save(tmp_path / sid / "unprocessed/3T/T1w_MPR1" / f"{sid}_3T_T1w_MPR1.nii.gz", _vol())
    # A file the pattern must not pick up.
    _save(tmp_path / "100307" / "unprocessed/3T/T2w_SPC1" / "100307_3T_T2w_SPC1.nii.gz", _vol())
    src = GlobSource(str(tmp_path), "*/unprocessed/3T/T1w_MPR1/*_3T_T1w_MPR1.nii.gz")
    assert src.subject_ids() == ["100307", "100408"]
    assert src.location("100408").endswith("100408_3T_T1w_MPR1.nii.gz")
    vol = src.load("100307")
    assert vol.hr.shape == (24, 24, 24) and vol.hr.dtype == np.float32 and vol.lr is None


def test_flat_folder_ids_and_whole_path_ids(tmp_path: Path) -> None:
    _save(tmp_path / "b.nii.gz", _vol())
    _save(tmp_path / "a.nii", _vol())
    assert GlobSource(str(tmp_path), "*.nii*").subject_ids() == ["a", "b"]
    _save(tmp_path / "sub1/ses1/t1.nii.gz", _vol())
    _save(tmp_path / "sub1/ses2/t1.nii.gz", _vol())
    with pytest.raises(VolumeError, match=r"ses2/t1\.nii\.gz: maps to subject id 'sub1'"):
        GlobSource(str(tmp_path), "sub*/*/t1.nii.gz").subject_ids()
    ids = GlobSource(str(tmp_path), "sub*/*/t1.nii.gz", id_depth=None).subject_ids()
    assert ids == ["sub1/ses1/t1", "sub1/ses2/t1"]


def test_construction_does_not_touch_disk_and_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    src = GlobSource(str(missing))  # no error yet: configs may be built anywhere
    with pytest.raises(VolumeError, match=rf"^{missing}: data root not found$"):
        src.subject_ids()


def test_empty_glob_names_root_and_pattern(tmp_path: Path) -> None:
    _save(tmp_path / "x.nii.gz", _vol())
    with pytest.raises(VolumeError, match=rf"^{tmp_path}: no files match the pattern '\*/T1\.nii\.gz'$"):
        GlobSource(str(tmp_path), "*/T1.nii.gz").subject_ids()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((24, 24, 24, 2), np.float32), r"4D with 2 volumes \(shape \(24, 24, 24, 2\)\)"),
        (np.zeros((24, 24), np.float32), r"not 3D \(shape \(24, 24\)\)"),
        (np.where(np.eye(24)[..., None] > 0, np.nan, 1.0).repeat(24, 2).astype(np.float32), r"contains 576 NaN and 0 Inf"),
        (np.full((24, 24, 24), np.inf, np.float32), r"contains 0 NaN and 13824 Inf"),
    ],
    ids=["4d-two-volumes", "2d", "nan", "inf"],
)
def test_bad_volume_messages_name_the_file(tmp_path: Path, data: np.ndarray, message: str) -> None:
    path = _save(tmp_path / "bad.nii.gz", data)
    with pytest.raises(VolumeError, match=rf"^{path}: {message}"):
        load_volume(path)
    with pytest.raises(VolumeError, match=rf"^{path}: "):
        GlobSource(str(tmp_path)).load("bad")


def test_4d_with_one_volume_is_squeezed(tmp_path: Path) -> None:
    data = _vol(shape=(24, 24, 24, 1))
    loaded = load_volume(_save(tmp_path / "one.nii.gz", data))
    out, affine = loaded.data, loaded.affine
    assert out.shape == (24, 24, 24) and np.array_equal(out, data[..., 0]) and affine.shape == (4, 4)


def test_not_nifti_and_missing_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("this is not a NIfTI file\n")
    with pytest.raises(VolumeError, match=rf"^{fake}: not readable as NIfTI \("):
        load_volume(fake)
    with pytest.raises(VolumeError, match=rf"^{tmp_path / 'gone.nii'}: no such file$"):
        load_volume(tmp_path / "gone.nii")


def test_patch_fit_message_names_shape_and_patch() -> None:
    check_patch_fits((24, 24, 24), (8, 8, 8), "f.nii")
    with pytest.raises(VolumeError, match=r"^f\.nii: volume shape \(24, 6, 24\) is smaller than the patch size \(8, 8, 8\)"):
        check_patch_fits((24, 6, 24), (8, 8, 8), "f.nii")


def test_paired_lr_files_and_grid_mismatch(tmp_path: Path) -> None:
    hr, lr = _vol(1), _vol(2)
    _save(tmp_path / "hr/s1.nii.gz", hr)
    _save(tmp_path / "lr/s1.nii.gz", lr)
    src = GlobSource(str(tmp_path), "hr/*.nii.gz", id_depth=None, lr_pattern="lr/*.nii.gz")
    # id_depth=None keeps the folder in the id, so HR and LR ids differ: a clear error.
    with pytest.raises(VolumeError, match="no LR file for subject 'hr/s1'"):
        src.subject_ids()
    src = GlobSource(str(tmp_path / "hr"), "*.nii.gz", lr_root=str(tmp_path / "lr"), lr_pattern="*.nii.gz")
    vol = src.load("s1")
    assert np.array_equal(vol.hr, hr) and np.array_equal(vol.lr, lr)

    _save(tmp_path / "lr/s1.nii.gz", _vol(3, (24, 24, 12)))
    src = GlobSource(str(tmp_path / "hr"), "*.nii.gz", lr_root=str(tmp_path / "lr"), lr_pattern="*.nii.gz")
    with pytest.raises(VolumeError, match=r"lr/s1\.nii\.gz: LR grid shape \(24, 24, 12\) does not match the HR grid \(24, 24, 24\)"):
        src.load("s1")
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    _save(tmp_path / "lr/s1.nii.gz", lr, shifted)
    src = GlobSource(str(tmp_path / "hr"), "*.nii.gz", lr_root=str(tmp_path / "lr"), lr_pattern="*.nii.gz")
    with pytest.raises(VolumeError, match=r"lr/s1\.nii\.gz: LR affine differs from the HR affine"):
        src.load("s1")


def test_glob_source_argument_checks() -> None:
    with pytest.raises(ValueError, match="id_depth"):
        GlobSource("/x", id_depth=0)
    with pytest.raises(ValueError, match="lr_root is given but lr_pattern is not"):
        GlobSource("/x", lr_root="/y")
    with pytest.raises(ValueError, match="pattern"):
        GlobSource("/x", pattern="")


# ----------------------------------------------------------------------------- embedded
def test_embedded_slabs_tile_the_template_and_lr_is_cut_from_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = degradation.degrade

    def counting(volume: np.ndarray, factors=(2, 2, 1), interpolation="linear") -> np.ndarray:
        calls.append(volume.shape)
        return real(volume, factors, interpolation)

    monkeypatch.setattr(degradation, "degrade", counting)
    src = EmbeddedMNI152Source(resolution=2, num_slabs=4, axis=2)
    template, affine = src.template()
    assert template.shape == (99, 117, 95) and src.shape == (99, 117, 95)
    ids = src.subject_ids()
    assert ids == sorted(ids) and len(ids) == 4
    vols = [src.load(i) for i in ids]
    lo, hi = src.extent()
    assert np.array_equal(np.concatenate([v.hr for v in vols], axis=2), template[:, :, lo:hi])
    assert [v.hr.shape[2] for v in vols] == [b - a for a, b in src.slab_bounds()]
    # Each slab's affine maps its voxel (0, 0, 0) to the template's voxel (0, 0, start).
    for v, (start, _) in zip(vols, src.slab_bounds()):
        assert np.allclose(v.affine @ [0, 0, 0, 1], affine @ [0, 0, start, 1])
        assert v.scale == pytest.approx(np.percentile(template, 99.9))

    lrs = [src.degraded(i, (2, 2, 1), "linear") for i in ids]
    whole = real(np.asarray(template), (2, 2, 1), "linear")
    assert np.array_equal(np.concatenate(lrs, axis=2), whole[:, :, lo:hi])
    assert calls == [(99, 117, 95)]  # once, on the whole template, for all slabs
    # Along the undegraded axis, cutting commutes with the degradation (why axis=2 is the default).
    assert np.allclose(real(vols[1].hr, (2, 2, 1), "linear"), lrs[1], atol=1e-4)


def test_embedded_slabs_across_a_degraded_axis_still_come_from_the_whole_volume() -> None:
    src = EmbeddedMNI152Source(resolution=2, num_slabs=3, axis=0, crop=False)
    whole = degradation.degrade(np.asarray(src.template()[0]), (2, 2, 1), "linear")
    ids = src.subject_ids()
    lrs = [src.degraded(i, (2, 2, 1), "linear") for i in ids]
    assert np.array_equal(np.concatenate(lrs, axis=0), whole)
    # Degrading a slab by itself would differ: k-space truncation is a whole-volume operation.
    assert not np.allclose(degradation.degrade(src.load(ids[1]).hr, (2, 2, 1), "linear"), lrs[1], atol=1e-2)


def test_embedded_other_axis_and_argument_checks() -> None:
    src = EmbeddedMNI152Source(resolution=2, num_slabs=3, axis=0, crop=False)
    assert sum(src.load(i).hr.shape[0] for i in src.subject_ids()) == 99
    assert "slab 2/3" in src.location(src.subject_ids()[1])
    with pytest.raises(ValueError, match="resolution must be 1 or 2"):
        EmbeddedMNI152Source(resolution=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_slabs must be an int >= 1"):
        EmbeddedMNI152Source(num_slabs=0)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        EmbeddedMNI152Source(axis=3)
    with pytest.raises(ValueError, match="exceeds the template's 95 slices"):
        EmbeddedMNI152Source(resolution=2, num_slabs=96)


@pytest.mark.parametrize("resolution", [1, 2])
def test_embedded_crop_keeps_only_slices_the_metrics_can_score(resolution: int) -> None:
    cropped = EmbeddedMNI152Source(resolution=resolution, num_slabs=5)
    whole = EmbeddedMNI152Source(resolution=resolution, num_slabs=5, crop=False)
    template = cropped.template()[0] / cropped.template_scale()
    fraction = (template > 0.05).mean(axis=(0, 1))
    lo, hi = cropped.extent()
    assert whole.extent() == (0, template.shape[2])
    assert 0 < lo < hi < template.shape[2]
    assert (fraction[lo:hi] >= 0.10).all() and fraction[lo - 1] < 0.10 and fraction[hi] < 0.10
    # every slab of the cropped source holds only scorable slices; uncropped, the first is air
    assert all(fraction[a:b].min() >= 0.10 for a, b in cropped.slab_bounds())
    a, b = whole.slab_bounds()[0]
    assert fraction[a:b].min() < 0.10
