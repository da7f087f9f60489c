"""The plain reference generator: same weights, same outputs and gradients as MDCSRN."""

from __future__ import annotations

import pytest
import torch

from mdcsrn_lightning.models import MDCSRN, count_parameters
from mdcsrn_lightning.models.reference import ReferenceMDCSRN, architecture_of, reference_like

from .conftest import randomize_batchnorm


@pytest.mark.parametrize(("recon", "residual"), [("direct", False), ("conv", False), ("direct", True)])
def test_reference_has_the_same_state_dict_and_output(recon: str, residual: bool) -> None:
    torch.manual_seed(0)
    net = MDCSRN(2, 3, 4, recon, global_residual=residual)  # type: ignore[arg-type]
    randomize_batchnorm(net)
    ref = ReferenceMDCSRN(2, 3, 4, recon, global_residual=residual)
    assert list(ref.state_dict()) == list(net.state_dict())
    assert count_parameters(ref) == count_parameters(net)
    ref.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 7, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), net.eval()(x), rtol=0, atol=1e-6)
    assert ref.receptive_field_radius() == net.receptive_field_radius()


def test_from_mdcsrn_copies_weights_architecture_and_mode() -> None:
    net = MDCSRN(2, 2, 4, "conv").train()
    ref = reference_like(net)
    assert isinstance(ref, ReferenceMDCSRN) and ref.training
    assert architecture_of(ref) == architecture_of(net)
    for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a copy, not shared storage
    next(ref.parameters()).data.add_(1.0)
    assert not torch.equal(next(ref.parameters()), next(net.parameters()))


def test_training_outputs_and_gradients_match() -> None:
    torch.manual_seed(1)
    net = MDCSRN(2, 4, 4).train()  # unit 4: 5k > 4k inputs, so it has a bottleneck
    ref = reference_like(net)
    x = torch.rand(2, 1, 6, 6, 6)
    losses = []
    for model in (net, ref):
        y = model(x)
        loss = (y - x).abs().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_reference_accepts_memory_efficient_and_rejects_bad_reconstruction() -> None:
    ReferenceMDCSRN(1, 1, 4, memory_efficient=True)  # a generator config builds either class
    with pytest.raises(ValueError, match="reconstruction"):
        ReferenceMDCSRN(1, 1, 4, reconstruction="pixelshuffle")
