"""Inputs as they come: DICOM series folders, FreeSurfer .mgz and BIDS datasets, read by the
package's one reader (data/volume_io.py) for training sources, mdcsrn-eval and mdcsrn-infer."""

from __future__ import annotations

import json
import locale
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mdcsrn_lightning.cli import eval as eval_cli
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.cli.train import train
from mdcsrn_lightning.data.bids import BidsSource, parse_bids_name
from mdcsrn_lightning.data.mix import MixSource
from mdcsrn_lightning.data.sources import GlobSource, VolumeError
from mdcsrn_lightning.data.split import SplitError, load_or_create_split, read_split, split_counts, write_split
from mdcsrn_lightning.data.volume_io import is_dicom_series, load_volume
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.data.volume_io import collect_inputs
from mdcsrn_lightning.inference.files import plan_outputs

from .conftest import compose_train
from .test_inference import run_cli, write_tiny_checkpoint

# oblique (rotated about z), anisotropic, off-centre: a geometry a wrong axis order or LPS/RAS
# mix-up cannot reproduce
THETA = 0.3
AFFINE = np.eye(4)
AFFINE[:3, :3] = np.array(
    [[np.cos(THETA), -np.sin(THETA), 0.0], [np.sin(THETA), np.cos(THETA), 0.0], [0.0, 0.0, 1.0]]
) @ np.diag([0.9, 1.1, 2.0])
AFFINE[:3, 3] = [-10.5, 20.25, 30.0]
CTYPE_BEFORE = locale.setlocale(locale.LC_CTYPE)


def phantom(shape: tuple[int, int, int] = (16, 14, 8), seed: int = 0) -> np.ndarray:
    """Smooth integer blobs (DICOM stores integers): a brain-like volume with a background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    r = np.sqrt(((grid / 0.8) ** 2).sum(0))
    vol = 800 * (r < 1) + 200 * np.sin(4 * grid[0] + seed) * (r < 0.7) + rng.normal(0, 20, shape) * (r < 1)
    return np.clip(vol, 0, None).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def write_dicom_series(nifti: Path, folder: Path, series: int = 1) -> list[Path]:
    """The NIfTI as a DICOM series (one file per slice), written by SimpleITK's GDCM writer:
    each slice's position and the series' orientation from the NIfTI's geometry."""
    image = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    d = image.GetDirection()
    study = "1.2.826.0.1.3680043.2.1125.7"
    uid = f"{study}.{series}"
    tags = {
        "0008|0060": "MR",
        "0010|0010": "Test^Phantom",
        "0020|000d": study,
        "0020|000e": uid,
        "0020|0011": str(series),
        "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
    }
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    # GDCM's writer sets the process locale to "C" (text files opened later in this pytest
    # process would then be read as ASCII): put it back
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(image, writer, tags, uid, series, folder, files)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return files


def _write_slices(image: sitk.Image, writer: sitk.ImageFileWriter, tags: dict[str, str], uid: str, series: int, folder: Path, files: list[Path]) -> None:
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        path = folder / f"IM{series:02d}{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(piece)
        files.append(path)


@pytest.fixture
def dicom(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    data = phantom()
    nifti = write_nifti(tmp_path / "scan.nii.gz", data)
    folder = tmp_path / "T1_MPRAGE"
    write_dicom_series(nifti, folder)
    return nifti, folder, data


# ---------------------------------------------------------------------- DICOM
def test_dicom_series_is_read_with_the_nifti_geometry(dicom) -> None:
    nifti, folder, data = dicom
    assert locale.setlocale(locale.LC_CTYPE) == CTYPE_BEFORE  # the helper left the locale alone
    assert is_dicom_series(folder) and not is_dicom_series(nifti.parent)
    volume = load_volume(folder)
    assert volume.shape == data.shape and np.array_equal(volume.data, data.astype(np.float32))
    assert np.abs(volume.affine - AFFINE).max() < 1e-4  # orientation, spacing and origin kept
    assert volume.voxel_sizes == pytest.approx((0.9, 1.1, 2.0), abs=1e-5)
    assert int(volume.image.header["qform_code"]) == int(volume.image.header["sform_code"]) == 1
    # the training sources' reader is the same reader
    loaded = load_volume(folder)
    train_data, train_affine = loaded.data, loaded.affine
    assert np.array_equal(train_data, volume.data) and np.array_equal(train_affine, volume.affine)


def test_infer_on_a_dicom_folder_writes_nifti_with_its_geometry(dicom, tmp_path, monkeypatch, capsys) -> None:
    nifti, folder, _ = dicom
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "out"
    for given in (folder, nifti):
        code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={given}", f"output={out}", f"ckpt={ckpt}", "patches.size=16")
        assert code == 0, err
    from_dicom, from_nifti = nib.load(str(out / "T1_MPRAGE_sr.nii.gz")), nib.load(str(out / "scan_sr.nii.gz"))
    assert from_dicom.shape == from_nifti.shape == (16, 14, 8)
    assert np.abs(from_dicom.affine - nifti_affine(nifti)).max() < 1e-4
    assert from_dicom.header.get_zooms()[:3] == pytest.approx((0.9, 1.1, 2.0), abs=1e-5)
    # the same voxels in, the same network: the same output
    np.testing.assert_allclose(from_dicom.get_fdata(), from_nifti.get_fdata(), rtol=1e-5, atol=1e-3)


def nifti_affine(path: Path) -> np.ndarray:
    return nib.load(str(path)).affine


def test_folder_rule_and_bad_dicom_inputs(dicom, tmp_path) -> None:
    nifti, folder, _ = dicom
    # one series folder: one input volume, written as <folder>_sr.nii.gz
    assert collect_inputs(folder) == ([folder], False)
    assert plan_outputs([folder], tmp_path / "o", False) == [tmp_path / "o" / "T1_MPRAGE_sr.nii.gz"]
    # a study: one subfolder per series is a collection, each written as <series>.nii.gz
    study = tmp_path / "study"
    write_dicom_series(nifti, study / "s2", series=2)
    write_dicom_series(nifti, study / "s1", series=1)
    inputs, many = collect_inputs(study)
    assert inputs == [study / "s1", study / "s2"] and many
    assert plan_outputs(inputs, tmp_path / "o", True) == [tmp_path / "o" / "s1.nii.gz", tmp_path / "o" / "s2.nii.gz"]
    assert collect_inputs(str(study / "s*")) == ([study / "s1", study / "s2"], True)
    # a folder of NIfTI files stays a collection of files
    assert collect_inputs(tmp_path) == ([nifti], True)
    # two series mixed in one folder: refused by the reader and by the input rule
    mixed = tmp_path / "mixed"
    write_dicom_series(nifti, mixed, series=1)
    write_dicom_series(nifti, mixed, series=2)
    with pytest.raises(VolumeError, match=rf"^{mixed}: holds 2 DICOM series; give the folder of one series$"):
        load_volume(mixed)
    with pytest.raises(VolumeError, match="holds 2 DICOM series"):
        collect_inputs(mixed)
    # a missing slice (a gap in the positions), one .dcm file, a folder of something else
    files = sorted(folder.iterdir())
    files[3].unlink()
    with pytest.raises(VolumeError, match=rf"^{folder}: DICOM slices are not evenly spaced"):
        load_volume(folder)
    with pytest.raises(VolumeError, match=rf"^{files[0]}: is one DICOM file; give the folder"):
        load_volume(files[0])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(VolumeError, match="is a folder holding no DICOM series"):
        load_volume(tmp_path / "notes")
    with pytest.raises(VolumeError, match="no .nii, .nii.gz, .mgz or .img volume files and no DICOM series"):
        collect_inputs(tmp_path / "notes")


def test_training_source_reads_dicom_folders_and_refuses_alike(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    for i in range(2):
        nifti = write_nifti(tmp_path / f"s{i}.nii.gz", phantom(seed=i))
        write_dicom_series(nifti, root / f"subj{i}" / "T1", series=i + 1)
    source = GlobSource(str(root), pattern="*/T1", id_depth=1)
    assert source.subject_ids() == ["subj0", "subj1"]
    loaded = source.load("subj1")
    assert np.array_equal(loaded.hr, phantom(seed=1).astype(np.float32)) and np.abs(loaded.affine - AFFINE).max() < 1e-4
    token = source.cache_token("subj1")
    next((root / "subj1" / "T1").iterdir()).touch()  # a changed file changes the cache key
    assert source.cache_token("subj1") != token
    sorted((root / "subj0" / "T1").iterdir())[4].unlink()
    with pytest.raises(VolumeError, match="DICOM slices are not evenly spaced") as from_source:
        GlobSource(str(root), pattern="*/T1").load("subj0")
    with pytest.raises(InferenceError, match="DICOM slices are not evenly spaced") as from_infer:
        infer_read(root / "subj0" / "T1")
    assert str(from_source.value) == str(from_infer.value)


def test_data_module_trains_from_dicom_folders_through_its_cache(tmp_path: Path) -> None:
    """The series folders are read once, into the cache; the queue then cuts patches from it."""
    import torchio as tio

    from mdcsrn_lightning.data.datamodule import SRDataModule

    for i in range(4):
        nifti = write_nifti(tmp_path / f"s{i}.nii.gz", phantom(seed=i))
        write_dicom_series(nifti, tmp_path / "cohort" / f"subj{i}" / "T1", series=i + 1)
    dm = SRDataModule(
        GlobSource(str(tmp_path / "cohort"), pattern="*/T1"), patch_size=8, samples_per_volume=2, batch_size=2,
        queue_length=4, split_fractions=[2, 1, 0, 1], cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    entry = dm._entries[dm.split["test"][0]]
    assert entry.hr_file.startswith(str(tmp_path / "cache")) and entry.hr_file.endswith(".hr.npy")  # not held in memory
    assert next(iter(dm.train_dataloader()))["hr"][tio.DATA].shape == (2, 1, 8, 8, 8)
    test = next(iter(dm.test_dataloader()))
    (name,) = dm.split["test"]
    expected = phantom(seed=int(name[-1])).astype(np.float32)
    hr = test["hr"][tio.DATA][0, 0].numpy() * float(test["input_scale"][0])
    np.testing.assert_allclose(hr, expected, rtol=1e-5, atol=1e-3)
    assert np.abs(np.asarray(test["hr"][tio.AFFINE][0]) - AFFINE).max() < 1e-4


def infer_read(path: Path):
    """What mdcsrn-infer does with one input before any work: read and check it."""
    from mdcsrn_lightning.data.volume_write import NiftiError

    try:
        return load_volume(path, error=NiftiError)
    except VolumeError as exc:
        raise InferenceError(str(exc)) from None


def test_eval_scores_dicom_and_mgz_references_like_their_nifti(dicom, tmp_path, monkeypatch, capsys) -> None:
    nifti, folder, data = dicom
    mgz = tmp_path / "scan2.mgz"
    nib.save(nib.MGHImage(data.astype(np.float32), AFFINE), str(mgz))
    results = {}
    for name, inputs in (("other", f"[{folder},{mgz}]"), ("nifti", f"[{nifti}]")):
        out = tmp_path / f"eval_{name}"
        code, _, err = run_cli(
            monkeypatch, capsys, eval_cli, f"inputs={inputs}", "methods=[trilinear]", "perceptual=[]",
            "segmentation=false", "panels=false", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}",
        )
        assert code == 0, err
        rows = json.loads((out / "results.json").read_text())["per_subject"]
        results[name] = {r["subject"]: r["psnr"] for r in rows if r["method"] == "trilinear"}
    assert set(results["other"]) == {"T1_MPRAGE", "scan2"}
    # the same voxels, whatever the container: the same scores
    assert results["other"]["T1_MPRAGE"] == pytest.approx(results["nifti"]["scan"], rel=1e-6)
    assert results["other"]["scan2"] == pytest.approx(results["nifti"]["scan"], rel=1e-6)


def test_infer_on_mgz_writes_nifti_with_its_affine(tmp_path, monkeypatch, capsys) -> None:
    data = phantom().astype(np.float32)
    mgz = tmp_path / "in" / "brain.mgz"
    mgz.parent.mkdir()
    nib.save(nib.MGHImage(data, AFFINE), str(mgz))
    nifti = write_nifti(tmp_path / "brain.nii.gz", data)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={mgz.parent}", f"output={tmp_path / 'o'}", f"ckpt={ckpt}", "patches.size=16")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={nifti}", f"output={tmp_path / 'ref.nii.gz'}", f"ckpt={ckpt}", "patches.size=16")
    assert code == 0, err
    written, reference = nib.load(str(tmp_path / "o" / "brain.nii.gz")), nib.load(str(tmp_path / "ref.nii.gz"))
    assert np.abs(written.affine - AFFINE).max() < 1e-4
    np.testing.assert_allclose(written.get_fdata(), reference.get_fdata(), rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------- BIDS
# person -> sessions (None: no session level)
PEOPLE = {"01": ["pre", "post"], "02": ["pre", "post", "follow"], "03": None, "04": ["pre"], "05": ["pre", "post"], "06": None}


def make_bids(root: Path, people: dict[str, list[str] | None] = PEOPLE, shape=(16, 16, 10), participants: bool = True) -> Path:
    """A small BIDS raw tree with sidecars, a derivatives folder and participants.tsv."""
    for i, (label, sessions) in enumerate(people.items()):
        for j, ses in enumerate(sessions or [None]):
            folder = root / f"sub-{label}" / (f"ses-{ses}" if ses else "") / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{label}" + (f"_ses-{ses}" if ses else "")
            write_nifti(folder / f"{stem}_T1w.nii.gz", phantom(shape, seed=10 * i + j), np.diag([1.0, 1.0, 1.0, 1.0]))
            (folder / f"{stem}_T1w.json").write_text("{}")
            write_nifti(folder / f"{stem}_T2w.nii.gz", phantom(shape, seed=99), np.eye(4))
    (root / "derivatives" / "sub-01" / "anat").mkdir(parents=True)
    write_nifti(root / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", phantom(shape), np.eye(4))
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    if participants:
        rows = ["participant_id\tage"] + [f"sub-{p}\t{30 + i}" for i, p in enumerate(people)]
        (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_bids_names_subjects_and_groups(tmp_path: Path) -> None:
    assert parse_bids_name("sub-01_ses-2_run-1_T1w.nii.gz", "T1w") == {"sub": "01", "ses": "2", "run": "1"}
    assert parse_bids_name("ses-2_sub-01_T1w.nii.gz", "T1w") is None and parse_bids_name("sub-01_T2w.nii", "T1w") is None
    source = BidsSource(str(make_bids(tmp_path / "ds")))
    ids = source.subject_ids()
    expected = [f"sub-{p}" + (f"_ses-{s}" if s else "") for p, ses in PEOPLE.items() for s in (ses or [None])]
    assert ids == sorted(expected)  # T2w, sidecars and derivatives/ are not subjects
    groups = source.split_groups()
    assert groups == {sid: sid.split("_")[0] for sid in expected}
    assert source.participants["sub-02"]["age"] == "31"
    loaded = source.load("sub-02_ses-follow")
    assert loaded.location.endswith("sub-02/ses-follow/anat/sub-02_ses-follow_T1w.nii.gz")
    assert BidsSource(str(tmp_path / "ds"), sessions=["post"]).subject_ids() == ["sub-01_ses-post", "sub-02_ses-post", "sub-05_ses-post"]
    assert len(BidsSource(str(tmp_path / "ds"), suffix="T2w").subject_ids()) == len(expected)


def test_bids_split_keeps_every_person_in_one_set(tmp_path: Path) -> None:
    source = BidsSource(str(make_bids(tmp_path / "ds")))
    ids, groups = source.subject_ids(), source.split_groups()
    straddled_without_groups = 0
    for seed in range(20):
        split = load_or_create_split(ids, (2, 1, 0, 1), seed, groups=groups)
        where = {sid: name for name, members in split.items() for sid in members}
        assert sorted(where) == ids
        sets_of_person = {g: {where[s] for s in ids if groups[s] == g} for g in set(groups.values())}
        assert all(len(sets) == 1 for sets in sets_of_person.values()), (seed, sets_of_person)
        # the fractions count persons (6), not scans (11)
        persons = {name: {groups[s] for s in members} for name, members in split.items()}
        assert {k: len(v) for k, v in persons.items()} == split_counts(len(PEOPLE), (2, 1, 0, 1))
        plain = load_or_create_split(ids, (2, 1, 0, 1), seed)
        straddled_without_groups += any(
            len({n for n, m in plain.items() if any(groups[s] == g for s in m)}) > 1 for g in set(groups.values())
        )
    assert straddled_without_groups > 0  # the grouping is what keeps sessions together
    # a split file that separates one person's sessions is refused, naming both sessions
    path = tmp_path / "split.json"
    bad = {"train": [s for s in ids if s != "sub-02_ses-post"], "val": [], "eval": [], "test": ["sub-02_ses-post"]}
    write_split(path, bad)
    with pytest.raises(SplitError, match=r"'sub-02_ses-\w+' \(train\) and 'sub-02_ses-post' \(test\) belong to one subject 'sub-02'"):
        load_or_create_split(ids, path=path, groups=groups)
    # inside a mix, the groups carry the part's prefix
    mix = MixSource({"bids": {"source": source}})
    assert mix.split_groups()["bids/sub-01_ses-pre"] == "bids/sub-01"


def test_bids_bad_trees_are_one_line_errors(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", {"01": ["a"], "02": None}, participants=False)
    assert len(BidsSource(str(root)).subject_ids()) == 2  # participants.tsv is optional
    (root / "participants.tsv").write_text("subject\tage\nsub-01\t3\n")
    with pytest.raises(VolumeError, match=rf"^{root / 'participants.tsv'}: no participant_id column \(columns: subject, age\)$"):
        BidsSource(str(root)).subject_ids()
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-09\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BidsSource(str(root)).subject_ids()
    messages = [str(w.message) for w in caught]
    assert any("does not list 1 subject(s) with scans, e.g. sub-02" in m for m in messages)
    assert any("lists 1 subject(s) without a T1w scan, e.g. sub-09" in m for m in messages)
    wrong = root / "sub-02" / "anat" / "sub-03_T1w.nii.gz"
    write_nifti(wrong, phantom(), np.eye(4))
    with pytest.raises(VolumeError, match=rf"^{wrong}: entities sub-03 disagree with its folder sub-02$"):
        BidsSource(str(root)).subject_ids()
    with pytest.raises(VolumeError, match="no sub-\\*/\\[ses-\\*/\\]anat/\\*_FLAIR.nii\\[.gz\\] scans"):
        BidsSource(str(root), suffix="FLAIR").subject_ids()
    with pytest.raises(VolumeError, match="BIDS root not found"):
        BidsSource(str(tmp_path / "nope")).subject_ids()
    with pytest.raises(ValueError, match="sessions must be a non-empty list"):
        BidsSource(str(root), sessions=["ses-a"])


def test_train_on_a_bids_tree_splits_by_person(tmp_path: Path) -> None:
    """`mdcsrn-train data=bids ... trainer.max_steps=2` (the real config, composed as Hydra does)."""
    root = make_bids(tmp_path / "ds")
    cfg = compose_train(
        [
            "depth=b1u2", "width=k4", "logger=csv", "data=bids", f"data.source.root={root}",
            "data.split_fractions=[2,1,0,1]", "data.patch_size=8", "data.samples_per_volume=2",
            "data.batch_size=2", "data.queue_length=8", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "baselines=[linear]",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert "test/psnr" in metrics
    out = tmp_path / "run"
    split = read_split(out / "split.json")
    person_sets = {}
    for name, members in split.items():
        for sid in members:
            person_sets.setdefault(sid.split("_")[0], set()).add(name)
    assert len(person_sets) == len(PEOPLE) and all(len(s) == 1 for s in person_sets.values())
    result = json.loads((out / "metrics.json").read_text())
    assert result["methods"]["model"]["n_subjects"] == len(split["test"])
