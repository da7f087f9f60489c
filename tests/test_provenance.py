"""Provenance beside every ``mdcsrn-infer`` output (``<out>.json``) and BIDS-derivative outputs
(``bids=true``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import pytest

import mdcsrn_lightning
from mdcsrn_lightning.cli import infer as infer_cli
from mdcsrn_lightning.inference.base import InferenceError
from mdcsrn_lightning.inference.bids import bids_output
from mdcsrn_lightning.inference.sidecars import sidecar_path, std_path

from .test_inference import ANATOMICAL, run_cli, write_tiny_checkpoint

FAST = ["patches.size=24", "progress=false", "device=cpu"]
RELEASE = {"version": "test-1", "data_consistency": False, "trained_on": "nothing real"}


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_sidecar_says_what_made_the_output(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt", release=RELEASE,
                                 datamodule_hyper_parameters={"factors": [2, 2, 1], "interpolation": "linear"})
    out = tmp_path / "sr.nii.gz"
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}",
                                "degrade=true", "data_consistency=true", "uncertainty=true", *FAST)
    assert code == 0, err
    sidecar = tmp_path / "sr.json"
    assert _last_json(stdout)["provenance"] == [str(sidecar)]
    record = json.loads(sidecar.read_text())
    assert record["package"] == {"name": "mdcsrn-lightning", "version": mdcsrn_lightning.__version__}
    assert record["checkpoint"]["path"] == str(ckpt.resolve())
    assert record["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["checkpoint"]["release"] == RELEASE
    assert record["degradation"]["factors"] == [2.0, 2.0, 1.0] and record["degradation"]["axes"] == [0, 1]
    assert record["degradation"]["interpolation"] == "linear"
    assert record["degrade"] is True and record["upsample"] is None
    assert record["data_consistency"] is True and record["uncertainty"] is True
    assert record["inferer"]["name"] == "ensemble[patches[torch]]"
    assert record["inferer"]["options"]["patch_size"] == 24 and record["inferer"]["options"]["uncertainty"] is True
    assert record["input"] == str(ANATOMICAL.resolve()) and record["output"] == str(out.resolve())
    assert record["std"] == str((tmp_path / "sr_std.nii.gz").resolve())
    assert 0 < record["seconds"] < 600


def test_the_sidecar_path_is_checked_before_anything_is_written(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "sr.nii.gz"
    (tmp_path / "sr.json").write_text("{}")
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}", *FAST)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"mdcsrn-infer: error: {tmp_path / 'sr.json'}: already exists; pass overwrite=true to replace it")
    assert not out.exists() and (tmp_path / "sr.json").read_text() == "{}"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={ANATOMICAL}", f"output={out}", f"ckpt={ckpt}",
                           "overwrite=true", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "sr.json").read_text())["output"] == str(out.resolve())


def test_side_file_names() -> None:
    assert sidecar_path("d/sr.nii.gz") == Path("d/sr.json") and sidecar_path("d/sr.nii") == Path("d/sr.json")
    assert std_path("d/sr.nii.gz") == Path("d/sr_std.nii.gz") and std_path("d/x.NII") == Path("d/x_std.NII")
    assert std_path("sub-01_desc-sr_T1w.nii.gz") == Path("sub-01_desc-srstd_T1w.nii.gz")


def test_bids_names() -> None:
    root = Path("/d")
    assert bids_output("/raw/sub-01/anat/sub-01_T1w.nii.gz", root) == root / "sub-01/anat/sub-01_desc-sr_T1w.nii.gz"
    assert bids_output("/raw/sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-1_T2w.nii", root) == (
        root / "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-1_desc-sr_T2w.nii.gz")
    assert bids_output("/x/sub-A_desc-brain_T1w.nii.gz", root) == root / "sub-A/anat/sub-A_desc-sr_T1w.nii.gz"
    for bad in ("/x/scan.nii.gz", "/x/sub-01.nii.gz", "/x/sub-01_T1w.mgz", "/x/sub_01_T1w.nii"):
        with pytest.raises(InferenceError, match=f"^{bad}: not a BIDS-like name"):
            bids_output(bad, root)


def _fake_bids(root: Path) -> list[Path]:
    image = nib.load(str(ANATOMICAL))
    files = [root / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
             root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-2_T1w.nii.gz"]
    for f in files:
        f.parent.mkdir(parents=True)
        nib.save(image, str(f))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.9.0"}))
    return files


def test_bids_outputs_for_a_small_tree(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    files = _fake_bids(tmp_path / "raw")
    out = tmp_path / "derivatives" / "sr"
    code, stdout, err = run_cli(monkeypatch, capsys, infer_cli, f"input={tmp_path / 'raw'}/**/*_T1w.nii.gz",
                                f"output={out}", f"ckpt={ckpt}", "bids=true", "uncertainty=true", *FAST)
    assert code == 0, err
    expected = [out / "sub-01/anat/sub-01_desc-sr_T1w.nii.gz", out / "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-sr_T1w.nii.gz"]
    assert _last_json(stdout)["outputs"] == [str(p) for p in expected]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(["dataset_description.json", "sub-01/anat/sub-01_desc-sr_T1w.json",
                              "sub-01/anat/sub-01_desc-sr_T1w.nii.gz", "sub-01/anat/sub-01_desc-srstd_T1w.nii.gz",
                              "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-sr_T1w.json",
                              "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-sr_T1w.nii.gz",
                              "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-srstd_T1w.nii.gz"])
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] and description["Name"]
    assert description["GeneratedBy"][0]["Name"] == "mdcsrn-lightning"
    assert description["GeneratedBy"][0]["Version"] == mdcsrn_lightning.__version__
    assert json.loads(sidecar_path(expected[1]).read_text())["input"] == str(files[1].resolve())


def test_bids_refuses_a_non_bids_input_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    files = _fake_bids(tmp_path / "raw")
    stray = files[0].parent / "scan.nii.gz"
    nib.save(nib.load(str(ANATOMICAL)), str(stray))
    out = tmp_path / "sr"
    code, _, err = run_cli(monkeypatch, capsys, infer_cli, f"input={files[0].parent}", f"output={out}",
                           f"ckpt={ckpt}", "bids=true", *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"mdcsrn-infer: error: {stray}: not a BIDS-like name")
    assert not out.exists()
