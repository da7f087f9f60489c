"""The released weights: small, self-describing, and the default of `mdcsrn-infer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mdcsrn_lightning.checkpoints import load_generator
from mdcsrn_lightning.models import MDCSRN
from mdcsrn_lightning.release import MODEL_CARD, RELEASED_WEIGHTS, released_weights

REAL_T1 = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def test_released_checkpoint_is_small_and_loads_weights_only() -> None:
    assert released_weights().stat().st_size < 5 * 2**20
    checkpoint = torch.load(RELEASED_WEIGHTS, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in checkpoint
    assert checkpoint["datamodule_hyper_parameters"]["interpolation"] == "zero_filled"
    # trained under the LR-only input rule, and records the measured data-consistency choice
    assert checkpoint["datamodule_hyper_parameters"]["input_scale"] == "lr_p99.9"
    assert checkpoint["release"]["data_consistency"] is True
    net, config = load_generator(RELEASED_WEIGHTS)
    assert isinstance(net, MDCSRN) and config["global_residual"] is True
    assert (config["num_blocks"], config["units_per_block"], config["growth_rate"]) == (2, 4, 8)
    assert "mdcsrn-train experiment=release_cpu" in MODEL_CARD.read_text()


def _infer_without_ckpt(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``mdcsrn-infer input=src output=out`` in a fresh interpreter; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "mdcsrn_lightning.cli.infer", f"input={src}", f"output={out}", "progress=false"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_infer_without_ckpt_uses_released_weights_on_a_real_t1(tmp_path: Path) -> None:
    out = tmp_path / "sr.nii.gz"
    proc = _infer_without_ckpt(REAL_T1, out)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"] == str(RELEASED_WEIGHTS)
    src, sr = nib.load(REAL_T1), nib.load(out)
    assert sr.shape == src.shape and np.array_equal(sr.affine, src.affine)
    assert sr.header.get_zooms() == src.header.get_zooms()
    data = np.asarray(sr.dataobj)
    assert data.dtype.name == "float32" and np.isfinite(data).all()
    # the output stays on the input's intensity scale
    assert abs(np.percentile(data, 99.9) / np.percentile(src.get_fdata(), 99.9) - 1) < 0.2


def test_coarse_matrix_weights_are_v2s_network_trained_on_magnitude_images() -> None:
    from mdcsrn_lightning.release import RELEASED_COARSE_WEIGHTS

    assert RELEASED_COARSE_WEIGHTS.stat().st_size < 5 * 2**20
    checkpoint = torch.load(RELEASED_COARSE_WEIGHTS, map_location="cpu", weights_only=True)
    hp = checkpoint["datamodule_hyper_parameters"]
    assert (hp["interpolation"], hp["factors"], hp["input_scale"]) == ("zero_filled_magnitude", [2, 2, 1], "lr_p99.9")
    assert checkpoint["release"]["data_consistency"] is True and checkpoint["release"]["version"] == "v3"
    assert load_generator(RELEASED_COARSE_WEIGHTS)[1] == load_generator(RELEASED_WEIGHTS)[1]
    card = MODEL_CARD.read_text()
    assert "mdcsrn_b2u4k8_realmix_magnitude.ckpt" in card and "data.interpolation=zero_filled_magnitude" in card


def test_thick_slice_weights_record_their_degradation_and_card() -> None:
    from mdcsrn_lightning.checkpoints import load_trained_model
    from mdcsrn_lightning.release import RELEASED_THICK_WEIGHTS, THICK_MODEL_CARD

    assert RELEASED_THICK_WEIGHTS.stat().st_size < 5 * 2**20
    model = load_trained_model(RELEASED_THICK_WEIGHTS)
    assert model.degradation == "slices" and model.slice_axis == 2 and model.interpolation == "cubic"
    assert model.data["slices"]["thickness"] == [2.0, 6.0] and model.data["slices"]["profile"] == "boxcar"
    # slice data consistency was measured better with it on every held-out real scan (MODEL_CARD_thick.md)
    assert model.recommends_data_consistency and model.release["version"] == "thick-v1.1"
    assert "mdcsrn-train experiment=release_thick_cpu" in THICK_MODEL_CARD.read_text()


def test_infer_without_ckpt_gives_a_thick_slice_scan_the_thick_weights(tmp_path: Path) -> None:
    from mdcsrn_lightning.release import RELEASED_THICK_WEIGHTS

    src = tmp_path / "thick.nii.gz"
    data = np.asarray(nib.load(REAL_T1).dataobj, dtype=np.float32)[:, :, ::2]  # 2 mm in-plane, 4 mm slices
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 4.0, 1.0])), str(src))
    out = tmp_path / "sr.nii.gz"
    proc = _infer_without_ckpt(src, out)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"] == str(RELEASED_THICK_WEIGHTS)
    assert "using the released thick-slice weights mdcsrn_b2u4k8_thick.ckpt with upsample=auto" in proc.stderr
    sr = nib.load(out)
    assert sr.shape == (data.shape[0], data.shape[1], 2 * data.shape[2])
    np.testing.assert_allclose(sr.header.get_zooms(), (2.0, 2.0, 2.0), atol=1e-5)
