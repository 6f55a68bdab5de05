"""Optimizers (AdamW, SGD, LARS) and the warm-up + cosine learning-rate schedule.

BYOL's paper recipe is LARS with base lr 0.2 x batch/256 and weight decay 1.5e-6, biases and
normalisation parameters excluded from both the weight decay and the LARS adaptation. With
Adam-type optimizers a learning rate near 3e-4 works; a LARS-scale lr with Adam collapses
(byol-pytorch#39, #44).

>>> import torch
>>> from byol3d.training.optim import build_optimizer, warmup_cosine
>>> net = torch.nn.Linear(4, 2)
>>> opt = build_optimizer(net, "lars", lr=0.1, weight_decay=1.5e-6)
>>> sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps=10, total_steps=100))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from byol3d.checks import check_number

OPTIMIZERS = ("adamw", "sgd", "lars")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: weights with decay; biases and norm parameters without.

    A parameter with one dimension (biases, batch/group/instance norm scales and shifts) goes to
    the second group, which also carries ``lars_exclude=True`` so LARS leaves it unadapted.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as BYOL uses it.

    For each parameter not in a group with ``lars_exclude=True``, the update
    ``g + weight_decay * w`` is rescaled by ``trust = eta * ||w|| / ||g + weight_decay * w||``
    (1 when either norm is zero) before the momentum step.

    Args:
        params: parameters or groups (see :func:`param_groups`).
        lr: learning rate.
        momentum: heavy-ball momentum (0.9 in the paper).
        weight_decay: L2 weight decay folded into the update.
        eta: trust coefficient (0.001 in the paper).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        check_number("lr", lr, 0.0, low_open=True)
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        check_number("weight_decay", weight_decay, 0.0)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, SGD (Nesterov-free, with momentum) or LARS over :func:`param_groups` of ``model``.

    AdamW is the fused (one kernel for all parameters) implementation when every parameter
    lives on a CUDA device; elsewhere PyTorch's default (``foreach``).
    """
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"invalid optimizer {name!r}, must be one of {', '.join(OPTIMIZERS)}")


class warmup_cosine:  # noqa: N801 - used like a function
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio``.

    Step k < warmup_steps gets ``(k + 1) / warmup_steps`` (so the first step already learns);
    the cosine then runs from 1 at ``warmup_steps`` to ``min_ratio`` at ``total_steps``.

    Pass it to ``torch.optim.lr_scheduler.LambdaLR`` and step the scheduler once per optimizer
    step. A class rather than a closure so that it pickles (DataLoader workers, checkpoints).

    >>> f = warmup_cosine(warmup_steps=10, total_steps=110)
    >>> f(0), f(4), f(10), f(60), f(110)
    (0.1, 0.5, 1.0, 0.5, 0.0)
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"invalid total_steps {total_steps!r}, must be >= 1")
        self.warmup_steps = max(0, min(int(warmup_steps), total_steps))
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
