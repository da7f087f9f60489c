"""``data.batched_augment``: the batched (device-side) ``augment=realistic`` against today's TorchIO path.

Tiny regions on the CPU. The statistical tests draw ~20 samples with fixed seeds from both
implementations and compare a statistic of each transform alone; the tolerances are wide
enough for 20 draws but far tighter than the errors they guard against (a wrong coordinate
normalisation, mm/voxel mix-up or sigma rule changes the statistic several-fold).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torchio as tio
from torchio.transforms.augmentation.intensity.random_bias_field import BiasField
from torchio.transforms.augmentation.spatial.random_elastic_deformation import (
    ElasticDeformation,
    RandomElasticDeformation,
)

from mdcsrn_lightning.data import batched_augment as ba
from mdcsrn_lightning.data import degradation
from mdcsrn_lightning.data.augment import RandomRicianNoise
from mdcsrn_lightning.data.batched_augment import BatchedRealistic, batched_flip_rot90, degrade_batch

OFF = {"affine_p": 0.0, "elastic_p": 0.0, "bias_p": 0.0, "gamma_p": 0.0, "noise_p": 0.0}
ALL = {"affine_p": 1.0, "elastic_p": 1.0, "bias_p": 1.0, "gamma_p": 1.0, "noise_p": 1.0}
P, M, R = 16, 8, 32  # patch, margin, region (16 + 2 * 8, a multiple of 2)
DRAWS = 20
CENTRE = slice(M, M + P)


def _smooth(seed: int = 0, shape: tuple[int, int, int] = (R, R, R)) -> torch.Tensor:
    """A smooth random volume in [0.1, 1], float32."""
    v = scipy.ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return torch.from_numpy(0.1 + 0.9 * (v - v.min()) / (v.max() - v.min())).float()


def _ours(options: dict, volume: torch.Tensor, spacing=(1.0, 1.0, 1.0), seed: int = 0, draws: int = DRAWS,
          factors=(2, 2, 1), interpolation: str = "linear", patch: int = P, margin: int = M
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr, hr_aug)`` ``(draws, patch, patch, patch)`` of ``draws`` copies of ``volume`` in one batch."""
    t = BatchedRealistic({**OFF, **options}, factors, interpolation, (patch,) * 3, margin)
    hr = volume.expand(draws, 1, *volume.shape[-3:]).clone()
    lr, out = t(hr, torch.tensor(spacing).expand(draws, 3), torch.Generator().manual_seed(seed))
    return lr[:, 0], out[:, 0]


def _torchio(transform: tio.Transform, volume: torch.Tensor, spacing=(1.0, 1.0, 1.0), seed: int = 0,
             draws: int = DRAWS) -> torch.Tensor:
    """``draws`` applications of a TorchIO ``transform`` to ``volume`` ``([C,] X, Y, Z)``: ``(draws, C, X, Y, Z)``."""
    torch.manual_seed(seed)
    outs = []
    for _ in range(draws):
        image = tio.ScalarImage(tensor=volume.reshape(-1, *volume.shape[-3:]).clone(), affine=np.diag([*spacing, 1.0]))
        outs.append(transform(tio.Subject(hr=image))["hr"].data)
    return torch.stack(outs)


def _ramps(n: int) -> torch.Tensor:
    """``(3, n, n, n)``: ``0.01 x`` the voxel index along each axis (linear interpolation keeps it exactly)."""
    idx = 0.01 * torch.arange(n, dtype=torch.float32)
    return torch.stack([idx[:, None, None].expand(n, n, n), idx[None, :, None].expand(n, n, n),
                        idx[None, None, :].expand(n, n, n)])


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("shape", [(20, 17, 9), (16, 16, 8)])
@pytest.mark.parametrize("interpolation", ["nearest", "linear", "cubic", "zero_filled"])
def test_degrade_batch_matches_degrade(shape: tuple[int, int, int], interpolation: str) -> None:
    volumes = np.random.default_rng(1).random((2, *shape)).astype(np.float32)
    for factors in [(2, 2, 1), (3, 1, 2), (1.5, 2, 1)]:
        out = degrade_batch(torch.from_numpy(volumes)[:, None], factors, interpolation).numpy()[:, 0]
        ref = np.stack([degradation.degrade(v, factors, interpolation) for v in volumes])
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_identity_options_give_degrade_of_region_and_its_crop(interpolation: str) -> None:
    region = _smooth(3)
    lr, hr = _ours({}, region, draws=2, interpolation=interpolation)
    ref = degradation.degrade(region.numpy(), (2, 2, 1), interpolation)[CENTRE, CENTRE, CENTRE]
    np.testing.assert_allclose(lr.numpy(), np.broadcast_to(ref, lr.shape), atol=1e-5, rtol=0)
    assert torch.equal(hr, region[CENTRE, CENTRE, CENTRE].expand_as(hr))


def test_zero_ranges_with_p1_are_identity_within_interpolation_rounding() -> None:
    region = _smooth(4)
    options = {**ALL, "degrees": 0.0, "scales": 0.0, "elastic_displacement": 0.0, "bias_coefficients": 0.0,
               "log_gamma": 0.0, "noise_p": 0.0}
    _, hr = _ours(options, region, draws=3)
    torch.testing.assert_close(hr, region[CENTRE, CENTRE, CENTRE].expand_as(hr), atol=1e-5, rtol=0)


def test_elastic_field_matches_itk_bspline_for_the_same_control_points() -> None:
    """Same control points (TorchIO's are in LPS: x, y indices reversed and x, y components
    negated) -> the same voxel displacement, to 0.03 voxel (ITK pads its grid's bounds by a
    fraction of a voxel, which we leave out); a sub-region at an offset is that field's crop."""
    n, spacing = 24, (1.0, 1.5, 2.0)
    torch.manual_seed(0)
    control = RandomElasticDeformation.get_params((7, 7, 7), (2.0, 2.0, 2.0), 2)
    image = tio.ScalarImage(tensor=_ramps(n), affine=np.diag([*spacing, 1.0]))
    out = ElasticDeformation(control_points=control, max_displacement=(2.0, 2.0, 2.0))(tio.Subject(hr=image))["hr"]
    expected = (out.data - _ramps(n)) / 0.01
    ras = torch.from_numpy(np.ascontiguousarray(control[::-1, ::-1] * np.array([-1, -1, 1], np.float32)))[None]
    ours = ba._elastic_displacement(ras, torch.zeros(1, 3, dtype=torch.long), (n,) * 3, (n,) * 3,
                                    torch.tensor([spacing]))[0]
    inner = slice(3, n - 3)  # where no sample point leaves the volume
    assert expected.abs().max() > 0.3
    torch.testing.assert_close(ours[:, inner, inner, inner], expected[:, inner, inner, inner], atol=0.03, rtol=0)
    crop = ba._elastic_displacement(ras, torch.tensor([[5, 7, 9]]), (12,) * 3, (n,) * 3, torch.tensor([spacing]))[0]
    torch.testing.assert_close(crop, ours[:, 5:17, 7:19, 9:21])


def test_bias_field_matches_torchio_formula_on_the_box() -> None:
    coefficients = np.random.default_rng(2).uniform(-0.3, 0.3, 20).tolist()
    field = np.log(BiasField.generate_bias_field(torch.empty(1, 20, 18, 16), 3, coefficients))
    ours = ba._bias_log_field(torch.tensor([coefficients]), torch.tensor([[3, 2, 1]]), (12, 12, 12), (20, 18, 16))
    np.testing.assert_allclose(ours[0].numpy(), field[3:15, 2:14, 1:13], atol=1e-5)


# ----------------------------------------------------------------------------- statistics vs TorchIO


def _relative_change(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out - ref).pow(2).mean(dim=(-3, -2, -1)).sqrt() / ref.pow(2).mean().sqrt()


def test_affine_alone_changes_like_torchio() -> None:
    """Relative RMS change of the centre patch: mean within 25%, spread below 2x TorchIO's."""
    volume = _smooth()
    _, ours = _ours({"affine_p": 1.0}, volume)
    theirs = _torchio(tio.RandomAffine(scales=0.05, degrees=5.0, default_pad_value="minimum"), volume)
    a = _relative_change(ours, volume[CENTRE, CENTRE, CENTRE])
    b = _relative_change(theirs[:, 0, CENTRE, CENTRE, CENTRE], volume[CENTRE, CENTRE, CENTRE])
    assert abs(float(a.mean() / b.mean()) - 1) < 0.25, (a.mean(), b.mean())
    assert float(a.std()) < 2 * float(b.std())


def test_affine_scale_above_one_enlarges_like_torchio() -> None:
    ramp = _ramps(R)[0]
    matrix = ba._affine_voxel_matrix(torch.zeros(1, 3), torch.tensor([[1.25, 1.0, 1.0]]), torch.ones(1, 3))
    ours = ba._warp(ramp[None, None], matrix, torch.zeros(1, 3, R, R, R))[0, 0]
    image = tio.ScalarImage(tensor=ramp[None].clone())
    theirs = tio.Affine(scales=(1.25, 1, 1), degrees=0, translation=0)(tio.Subject(hr=image))["hr"].data[0]
    torch.testing.assert_close(ours[4:-4], theirs[4:-4], atol=1e-5, rtol=0)


def _patch_weights(box: int, margin: int, patch: int, pool: int) -> torch.Tensor:
    """How often each voxel of a ``box`` is in the patch of a region at a uniform place, summed
    over groups of ``pool`` voxels: ``(box // pool,)``, sum 1."""
    weights = torch.zeros(box)
    for offset in range(box - 2 * margin - patch + 1):
        weights[offset + margin : offset + margin + patch] += 1
    return weights.reshape(-1, pool).sum(1) / weights.sum()


def test_elastic_alone_displaces_like_torchio() -> None:
    """Mean-square displacement (voxels) per component on anisotropic voxels. Ours: 4^3 patches
    (margin 8) over 400 draws, at random places in the virtual 112^3 box; TorchIO: 60 draws on
    a 28^3 box (the same geometry / 4: in voxels the field only depends on the relative
    position), weighted by how often each voxel is in a patch (zero within 2 voxels of the
    faces, where TorchIO pads). Within 20% (seeds 0-4 gave 0.90-1.09)."""
    spacing, patch, margin, pool = (1.0, 1.0, 2.0), 4, 8, 4
    box = BatchedRealistic(OFF, (2, 2, 1), "linear", (patch,) * 3, margin).box[0]
    w = _patch_weights(box, margin, patch, pool)
    weights = w[:, None, None] * w[None, :, None] * w[None, None, :]
    small = _ramps(box // pool)
    theirs = _torchio(tio.RandomElasticDeformation(max_displacement=2.0), small[[0, 2]], spacing, draws=60)
    ramps, centre = _ramps(patch + 2 * margin), slice(margin, margin + patch)
    for channel, axis in enumerate((0, 2)):
        _, ours = _ours({"elastic_p": 1.0}, ramps[axis], spacing, draws=400, patch=patch, margin=margin)
        a = ((ours - ramps[axis][centre, centre, centre]) / 0.01).pow(2).mean()
        b = (((theirs[:, channel] - small[axis]) / 0.01).pow(2).mean(0) * weights).sum()
        assert abs(float(a / b) - 1) < 0.2, (axis, a, b)
        assert float(a) > 0.01


def test_bias_alone_has_torchio_log_range_on_the_patch() -> None:
    """Range of log(bias) over the patch: ours (60 draws) vs TorchIO's field on the 112^3 box
    (12 draws, 8 random patch places each); means within 30% (other seeds: 0.82-1.0; a
    field normalised over the region instead of the box is 3x wider)."""
    const = torch.full((R, R, R), 0.5)
    _, ours = _ours({"bias_p": 1.0}, const, draws=60)
    log_field = torch.log(ours / 0.5).flatten(1)
    a = log_field.amax(1) - log_field.amin(1)
    box = BatchedRealistic(OFF, (2, 2, 1), "linear", (P, P, P), M).box[0]
    torch.manual_seed(0)
    generator, ranges = torch.Generator().manual_seed(1), []
    for _ in range(12):
        coefficients = tio.RandomBiasField(coefficients=0.3).get_params(3, (-0.3, 0.3))
        field = np.log(BiasField.generate_bias_field(torch.empty(1, box, box, box), 3, coefficients))
        for _ in range(8):
            s = torch.randint(M, box - M - P + 1, (3,), generator=generator).tolist()
            sub = field[s[0] : s[0] + P, s[1] : s[1] + P, s[2] : s[2] + P]
            ranges.append(float(sub.max() - sub.min()))
    b = torch.tensor(ranges)
    assert abs(float(a.mean() / b.mean()) - 1) < 0.3, (a.mean(), b.mean())


def _log_gamma(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mask = (ref > 0.15) & (ref < 0.85)
    return torch.stack([torch.log(torch.log(o[mask]) / torch.log(ref[mask])).median() for o in out])


def test_gamma_alone_draws_torchio_exponents() -> None:
    """Log-exponent estimated per draw (median of log(log out) / log(log in)): ours (400 draws,
    4^3 patches) all in +-0.2 (1e-4) and reaching +-0.19; its spread within 25% of TorchIO's
    (60 draws; seeds 0-4 gave 0.96-1.04)."""
    volume = _smooth(5, (12, 12, 12))
    _, ours = _ours({"gamma_p": 1.0}, volume, draws=400, patch=4, margin=4)
    theirs = _torchio(tio.RandomGamma(log_gamma=0.2), volume, draws=60)[:, 0]
    a = _log_gamma(ours, volume[4:8, 4:8, 4:8])
    b = _log_gamma(theirs, volume)
    assert float(a.abs().max()) <= 0.2 + 1e-4 and float(a.min()) < -0.19 and float(a.max()) > 0.19
    assert abs(float(a.std() / b.std()) - 1) < 0.25, (a.std(), b.std())


def test_gamma_treats_negatives_like_torchio() -> None:
    x = torch.tensor([-0.5, -0.1, 0.0, 0.2, 0.9]).reshape(1, 1, 5, 1, 1)
    ours = ba._gamma(x, torch.tensor([0.15]))
    theirs = tio.Gamma(float(np.exp(0.15)))(tio.ScalarImage(tensor=x[0].clone())).data[None]
    torch.testing.assert_close(ours, theirs)


def test_noise_alone_has_torchio_snr() -> None:
    """On a constant 0.5 region (all foreground), log(0.5 / std) estimates log(SNR). Ours (400
    draws, 8^3 patches): every draw within log([8, 60]) +- 0.1 (seeds 0-4: -0.03, +0.05), mean within 0.2 of TorchIO's
    (60 draws; log-uniform: sd 0.58; seeds 0-4 differed by <= 0.1)."""
    const = torch.full((12, 12, 12), 0.5)
    _, ours = _ours({"noise_p": 1.0}, const, draws=400, patch=8, margin=2)
    theirs = _torchio(RandomRicianNoise(snr=(8.0, 60.0)), const, draws=60)[:, 0]
    a = torch.log(0.5 / ours.flatten(1).std(1))
    b = torch.log(0.5 / theirs.flatten(1).std(1))
    assert np.log(8) - 0.1 < float(a.min()) and float(a.max()) < np.log(60) + 0.1
    assert abs(float(a.mean() - b.mean())) < 0.2, (a.mean(), b.mean())


# ----------------------------------------------------------------------------- seeds, shapes, errors


def test_each_sample_draws_each_transform_with_its_probability() -> None:
    """``noise_p=0.5``: of 64 samples in one batch, about half are left exactly as they were."""
    region = _smooth(7, (12, 12, 12))
    t = BatchedRealistic({**OFF, "noise_p": 0.5}, (2, 2, 1), "linear", (4, 4, 4), 4)
    out = t.augment(region.expand(64, 1, 12, 12, 12).clone(), torch.ones(64, 3), torch.Generator().manual_seed(0))
    kept = region.reshape(12, 12, 12)[tuple(slice(a, b) for a, b in t.window)]  # the part augment() computes
    unchanged = sum(torch.equal(o[0], kept) for o in out)
    assert 20 <= unchanged <= 44, unchanged


def test_row_quantile_matches_torch_quantile() -> None:
    x = torch.randn(3, 1001)
    for q in (0.0, 0.5, 0.999, 1.0):
        torch.testing.assert_close(ba._row_quantile(x, q), torch.quantile(x, q, dim=1))



def test_same_seed_same_output_other_seed_differs() -> None:
    region = _smooth(6)
    first = _ours(ALL, region, draws=3, seed=7)
    again = _ours(ALL, region, draws=3, seed=7)
    other = _ours(ALL, region, draws=3, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.allclose(first[1], other[1])


def test_cpu_shapes_and_region_size() -> None:
    t = BatchedRealistic(ALL, (2, 2, 1), "zero_filled", (9, 10, 5), 3)
    assert t.region_size == (16, 16, 11)  # 15 -> 16, 16, 11 (factor 1)
    hr = torch.rand(2, 1, *t.region_size, device="cpu")
    lr, out = t(hr, torch.tensor([[1.0, 1.0, 1.5], [0.7, 0.7, 1.0]]), torch.Generator(device="cpu").manual_seed(0))
    assert lr.shape == out.shape == (2, 1, 9, 10, 5)
    assert lr.device.type == out.device.type == "cpu" and lr.dtype == torch.float32
    assert torch.isfinite(lr).all() and (lr >= 0).all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bogus": 1}, r"unknown augment_options \['bogus'\]"),
        ({"gamma_p": 1.5}, r"augment_options\.gamma_p must be a probability"),
        ({"degrees": -1}, r"augment_options\.degrees must be >= 0"),
        ({"scales": 1.0}, r"augment_options\.scales must be in \[0, 1\)"),
        ({"elastic_displacement": "2"}, r"augment_options\.elastic_displacement must be a finite number"),
        ({"snr": [60, 8]}, r"augment_options\.snr must be two finite numbers"),
        ({"snr": 8}, r"augment_options\.snr must be two numbers"),
    ],
)
def test_bad_options_name_the_key(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchedRealistic(options, (2, 2, 1), "linear", (P, P, P), M)


def test_bad_geometry_and_inputs() -> None:
    with pytest.raises(ValueError, match="patch_size must be an int >= 1 or 3 ints"):
        BatchedRealistic(None, (2, 2, 1), "linear", (P, P), M)
    with pytest.raises(ValueError, match="margin must be an int >= 0"):
        BatchedRealistic(None, (2, 2, 1), "linear", (P, P, P), -1)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        BatchedRealistic(None, (2, 2, 1), "spline", (P, P, P), M)
    t = BatchedRealistic(None, (2, 2, 1), "linear", (P, P, P), M)
    with pytest.raises(ValueError, match=r"hr must be \(B, 1, \*\[32, 32, 32\]\)"):
        t(torch.zeros(1, 1, 30, 32, 32), torch.ones(1, 3), torch.Generator())


# ----------------------------------------------------------------------------- flips and rotations


def test_flip_rot90_keeps_pairs_aligned_and_covers_8_orientations() -> None:
    cube = torch.arange(27, dtype=torch.float32).reshape(1, 1, 3, 3, 3).expand(64, 1, 3, 3, 3).clone()
    lr, hr = batched_flip_rot90(cube, cube.clone(), (0, 1), [(0, 1)], torch.Generator().manual_seed(0))
    assert torch.equal(lr, hr)
    assert {tuple(v.flatten().tolist()) for v in lr} == {
        tuple(torch.rot90(torch.flip(cube[0], f), k, (1, 2)).flatten().tolist()) for f in [(), (1,)] for k in range(4)
    }  # all 8 elements of the (0, 1) plane's dihedral group, and nothing else
    lr, hr = batched_flip_rot90(2 * cube, cube.clone(), (0, 1, 2), [(0, 1)], torch.Generator().manual_seed(1))
    assert torch.equal(lr, 2 * hr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_is_seeded() -> None:
    """On CUDA: without noise the same seed gives the CPU's result (same parameter draws);
    with noise (a device generator) the same seed gives the same result twice."""
    t = BatchedRealistic({**ALL, "noise_p": 0.0}, (2, 2, 1), "cubic", (P, P, P), M)
    hr, spacing = _smooth(8).expand(3, 1, R, R, R).clone(), torch.tensor([[1.0, 1.0, 2.0]] * 3)
    cpu = t(hr, spacing, torch.Generator().manual_seed(3))
    gpu = t(hr.cuda(), spacing.cuda(), torch.Generator().manual_seed(3))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    noisy = BatchedRealistic(ALL, (2, 2, 1), "linear", (P, P, P), M)
    first = noisy(hr.cuda(), spacing.cuda(), torch.Generator().manual_seed(4))
    again = noisy(hr.cuda(), spacing.cuda(), torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
