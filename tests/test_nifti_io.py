"""NIfTI reading with checks and atomic, geometry-preserving writing (inference/nifti_io.py)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mdcsrn_lightning.data.sources import VolumeError
from mdcsrn_lightning.data import volume_write as nifti_io
from mdcsrn_lightning.data.volume_io import LoadedVolume, load_volume
from mdcsrn_lightning.data.volume_write import NiftiError, check_output_path, write_like



def _load(path: Path) -> LoadedVolume:
    """What mdcsrn-infer reads an input with: the one reader, raising NiftiError."""
    return load_volume(path, error=NiftiError)


ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
GEOMETRY_FIELDS = (
    "dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info",
)


def _oblique_image(path: Path, shape=(6, 7, 5), qcode=1, scode=4, dtype=np.int16) -> Path:
    """A small image with an oblique, anisotropic affine and distinct q/s-form codes."""
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.8, 1.9])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    data = (np.arange(np.prod(shape)).reshape(shape) % 97).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine @ np.diag([1, 1, 1, 1.0]), code=scode)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _assert_same_geometry(a: Path, b: Path) -> None:
    ha, hb = nib.load(str(a)).header, nib.load(str(b)).header
    for key in GEOMETRY_FIELDS:
        assert np.array_equal(ha[key], hb[key]), key
    assert np.array_equal(nib.load(str(a)).affine, nib.load(str(b)).affine)
    assert ha.get_zooms() == hb.get_zooms()


def test_roundtrip_keeps_geometry_of_real_file(tmp_path: Path) -> None:
    vol = _load(ANATOMICAL)
    assert vol.data.shape == (33, 41, 25) and vol.data.dtype == np.float32
    out = write_like(tmp_path / "sr.nii.gz", vol.data * 1.5, vol)
    _assert_same_geometry(ANATOMICAL, out)
    back = nib.load(str(out))
    assert back.get_data_dtype().name == "float32"  # (big-endian like the input header)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), vol.data * 1.5)


@pytest.mark.parametrize("qcode,scode", [(0, 2), (1, 4), (2, 0)])
def test_qform_sform_codes_and_oblique_affine_kept(tmp_path: Path, qcode: int, scode: int) -> None:
    src = _oblique_image(tmp_path / "in.nii.gz", qcode=qcode, scode=scode)
    vol = _load(src)
    out = write_like(tmp_path / "out.nii", vol.data, vol)
    _assert_same_geometry(src, out)
    h = nib.load(str(out)).header
    assert int(h["qform_code"]) == qcode and int(h["sform_code"]) == scode


def test_scaled_integer_input_is_read_as_real_intensities(tmp_path: Path) -> None:
    values = 2.5 * (np.arange(6 * 7 * 5).reshape(6, 7, 5) % 97) + 1000.25
    img = nib.Nifti1Image(values.astype(np.float32), np.eye(4))
    img.set_data_dtype(np.int16)  # nibabel stores int16 with scl_slope / scl_inter
    nib.save(img, str(tmp_path / "scaled.nii"))
    proxy = nib.load(str(tmp_path / "scaled.nii")).dataobj  # nibabel applies the scaling here
    slope, inter = float(proxy.slope), float(proxy.inter)
    assert (slope, inter) != (1.0, 0.0)
    vol = _load(tmp_path / "scaled.nii")
    np.testing.assert_allclose(vol.data, values, atol=abs(slope))
    out = write_like(tmp_path / "out.nii", vol.data, vol)
    out_proxy = nib.load(str(out)).dataobj
    assert (float(out_proxy.slope), float(out_proxy.inter)) == (1.0, 0.0)
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(dtype=np.float32), vol.data)


def test_single_volume_4d_is_read_3d_and_written_back_4d(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((5, 6, 4, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "one.nii.gz"))
    vol = _load(tmp_path / "one.nii.gz")
    assert vol.data.shape == (5, 6, 4)
    out = write_like(tmp_path / "sr.nii.gz", vol.data, vol)
    assert nib.load(str(out)).shape == (5, 6, 4, 1)
    _assert_same_geometry(tmp_path / "one.nii.gz", out)


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(p)), "4D with 2 volumes"),
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(p)), "not 3D"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), str(p)), "NaN"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.inf, np.float32), np.eye(4)), str(p)), "Inf"),
        (lambda p: p.write_text("this is not an image"), "not readable as NIfTI"),
    ],
)
def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path: Path, make, problem: str) -> None:
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(NiftiError) as info:
        _load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message
    assert isinstance(info.value, VolumeError)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(NiftiError, match="no such file"):
        _load(tmp_path / "nope.nii.gz")
    with pytest.raises(NiftiError, match="folder"):
        _load(tmp_path)


def test_existing_output_needs_overwrite_and_input_is_never_replaced(tmp_path: Path) -> None:
    src = _oblique_image(tmp_path / "in.nii.gz")
    vol = _load(src)
    out = tmp_path / "out.nii.gz"
    write_like(out, vol.data, vol)
    before = out.read_bytes()
    with pytest.raises(NiftiError, match="already exists"):
        write_like(out, vol.data + 1, vol)
    assert out.read_bytes() == before
    write_like(out, vol.data + 1, vol, overwrite=True)
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(dtype=np.float32), vol.data + 1)
    src_bytes = src.read_bytes()
    with pytest.raises(NiftiError, match="input"):
        write_like(src, vol.data, vol, overwrite=True)
    with pytest.raises(NiftiError, match="input"):  # the same file under another name
        os.symlink(src, tmp_path / "alias.nii.gz")
        check_output_path(tmp_path / "alias.nii.gz", overwrite=True, protect=(src,))
    assert src.read_bytes() == src_bytes
    with pytest.raises(NiftiError, match=r"\.nii"):
        check_output_path(tmp_path / "out.png")


def test_interrupted_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _oblique_image(tmp_path / "in.nii.gz")
    vol = _load(src)

    def broken_save(image, filename):  # writes half a file, then dies
        Path(filename).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(nifti_io.nib, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write_like(tmp_path / "out" / "sr.nii.gz", vol.data, vol)
    assert not (tmp_path / "out" / "sr.nii.gz").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind


def test_nan_result_and_wrong_shape_are_refused(tmp_path: Path) -> None:
    vol = _load(_oblique_image(tmp_path / "in.nii.gz"))
    with pytest.raises(NiftiError, match="NaN"):
        write_like(tmp_path / "a.nii.gz", np.full(vol.data.shape, np.nan), vol)
    with pytest.raises(NiftiError, match="shape"):
        write_like(tmp_path / "b.nii.gz", np.zeros((2, 2, 2)), vol)
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()
