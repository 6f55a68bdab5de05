from __future__ import annotations

import pytest
import torch
from torch import nn

from byol3d.training.optim import LARS, build_optimizer, param_groups, warmup_cosine


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_biases_and_norm_weights_excluded_from_decay():
    net = small_net()
    decay, no_decay = param_groups(net, 0.1)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(net[0].bias),
        id(net[1].weight),
        id(net[1].bias),
        id(net[2].bias),
    }
    assert (
        decay["weight_decay"] == 0.1
        and no_decay["weight_decay"] == 0.0
        and no_decay["lars_exclude"]
    )


def test_frozen_parameters_are_not_optimized():
    net = small_net()
    net[0].weight.requires_grad_(False)
    opt = build_optimizer(net, "adamw", lr=1e-3)
    assert all(p is not net[0].weight for g in opt.param_groups for p in g["params"])


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.5, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.1,
        momentum=0.9,
        eta=0.01,
    )
    w.grad = torch.tensor([0.5, 0.0])
    b.grad = torch.tensor([2.0])
    opt.step()
    update = torch.tensor([0.5, 0.0]) + 0.5 * torch.tensor([3.0, 4.0])
    trust = 0.01 * 5.0 / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * update)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # excluded: plain SGD


def test_build_optimizer_kinds():
    assert isinstance(build_optimizer(small_net(), "adamw", 1e-3), torch.optim.AdamW)
    assert isinstance(build_optimizer(small_net(), "sgd", 1e-3), torch.optim.SGD)
    assert isinstance(build_optimizer(small_net(), "lars", 0.2), LARS)
    with pytest.raises(ValueError, match="adam"):
        build_optimizer(small_net(), "adam", 1e-3)


def test_warmup_cosine_shape():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(k) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert warmup_cosine(0, 10)(0) == pytest.approx(1.0)
