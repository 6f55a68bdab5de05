from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import byol3d
from byol3d import BYOL, byol_loss, collapse_std, cosine_tau


def tiny_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


def tiny_byol(**kw):
    return BYOL(
        tiny_encoder(), input_shape=(8,), hidden_layer="3", projection_dim=3, hidden_dim=4, **kw
    )


def test_public_api_names():
    for name in ("build_encoder", "BYOL", "byol_loss", "cosine_tau"):
        assert hasattr(byol3d, name)


def test_byol_loss_equals_formula():
    torch.manual_seed(1)
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    expected = (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()
    torch.testing.assert_close(byol_loss(p, z), expected)
    assert byol_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    ).item() == pytest.approx(2.0)
    assert byol_loss(
        torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    ).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    ).item() == pytest.approx(4.0)


def test_byol_loss_stops_gradient_into_target():
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == 1.0
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    k, K = 30, 100
    assert cosine_tau(k, K, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / K) + 1) / 2)
    assert cosine_tau(500, 100) == 1.0  # clipped past the end
    with pytest.raises(ValueError, match="total_steps"):
        cosine_tau(0, 0)


def test_forward_equals_symmetric_loss_by_hand():
    model = tiny_byol().train()
    torch.manual_seed(2)
    v1, v2 = torch.randn(4, 8), torch.randn(4, 8)
    loss = model(v1, v2)
    # by hand: one concatenated batch (batch norm sees both views), then swap
    x = torch.cat([v1, v2])
    z = model.online_projector(model.online_encoder(x))
    p = model.predictor(z)
    t = model.target_projector(model.target_encoder(x))
    expected = byol_loss(p[:4], t[4:]) + byol_loss(p[4:], t[:4])
    torch.testing.assert_close(loss, expected)


def test_separate_views_normalises_each_view_alone():
    model, joint = tiny_byol(separate_views=True), tiny_byol()
    torch.manual_seed(2)
    v1, v2 = torch.randn(4, 8), torch.randn(4, 8)
    # in eval mode batch norm uses running statistics: both forms agree exactly
    torch.testing.assert_close(joint.eval()(v1, v2), model.eval()(v1, v2))
    loss = model.train()(v1, v2)
    # by hand: each view through each network alone (batch norm sees one view at a time)
    z1, z2 = (model.online_projector(model.online_encoder(v)) for v in (v1, v2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    t1, t2 = (model.target_projector(model.target_encoder(v)) for v in (v1, v2))
    torch.testing.assert_close(loss, byol_loss(p1, t2) + byol_loss(p2, t1))
    assert not torch.allclose(joint.train()(v1, v2), loss)  # batch statistics differ in training


def test_target_gets_no_gradient_and_holds_no_predictor():
    model = tiny_byol()
    loss = model(torch.randn(4, 8), torch.randn(4, 8))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.target_projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.online_encoder.parameters())
    assert not any(k.startswith("target_predictor") for k in model.state_dict())
    assert {n.split(".")[0] for n, _ in model.named_children()} == {
        "online_encoder",
        "online_projector",
        "predictor",
        "target_encoder",
        "target_projector",
    }


def test_target_is_a_copy_not_shared():
    model = tiny_byol()
    online = dict(model.online_encoder.named_parameters())
    for name, p in model.target_encoder.named_parameters():
        assert p.data_ptr() != online[name].data_ptr()
        assert torch.equal(p, online[name])


def _perturb_online(model):
    with torch.no_grad():
        for p in [*model.online_encoder.parameters(), *model.online_projector.parameters()]:
            p.add_(torch.randn_like(p))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_update_target_tau_zero_copies_online_exactly():
    model = tiny_byol()
    _perturb_online(model)
    model.update_target(0.0)
    for t, o in zip(_params(model.target_encoder), _params(model.online_encoder)):
        assert torch.equal(t, o)
    for t, o in zip(_params(model.target_projector), _params(model.online_projector)):
        assert torch.equal(t, o)


def test_update_target_tau_one_freezes_target_exactly():
    model = tiny_byol()
    before = _params(model.target_encoder) + _params(model.target_projector)
    _perturb_online(model)
    model.update_target(1.0)
    after = _params(model.target_encoder) + _params(model.target_projector)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.996])
def test_update_target_general_case(tau):
    model = tiny_byol()
    _perturb_online(model)
    old_t = _params(model.target_encoder) + _params(model.target_projector)
    online = _params(model.online_encoder) + _params(model.online_projector)
    model.update_target(tau)
    new_t = _params(model.target_encoder) + _params(model.target_projector)
    for n, t, o in zip(new_t, old_t, online):
        torch.testing.assert_close(n, tau * t + (1 - tau) * o, rtol=1e-6, atol=1e-7)
    # the predictor has no target and the online side is untouched
    assert all(
        torch.equal(a, b)
        for a, b in zip(online, _params(model.online_encoder) + _params(model.online_projector))
    )


def test_update_target_rejects_tau_outside_unit_interval():
    with pytest.raises(ValueError, match="tau"):
        tiny_byol().update_target(1.5)


def test_views_of_different_shape_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        tiny_byol()(torch.randn(4, 8), torch.randn(3, 8))


def test_collapse_std_is_one_for_spread_and_zero_for_collapsed():
    torch.manual_seed(0)
    spread = collapse_std(torch.randn(4096, 64))
    assert spread.item() == pytest.approx(1.0, abs=0.05)
    collapsed = collapse_std(torch.ones(64, 64) + 1e-6 * torch.randn(64, 64))
    assert collapsed.item() < 1e-3


def test_byol_on_monai_resnet_3d_shapes_and_stats():
    enc = byol3d.build_encoder("resnet10", spatial_dims=3)
    model = BYOL(enc, input_shape=(1, 32, 32, 32), projection_dim=16, hidden_dim=32)
    assert model.feature_dim == 512 and model.encoder is enc
    loss, stats = model(
        torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32), return_stats=True
    )
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    assert stats["collapse"].ndim == 0 and stats["collapse"].item() > 0
