"""TODO docstring for training.checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

from byol3d.config import OPTIONS, flatten
from byol3d.errors import NonFiniteLossError

# Keys that may differ between a run and its resumption: they change how long or how the run
# is executed, not what it learns.
RESUMABLE_KEYS = frozenset(
    {
        "output_dir",
        "train.max_epochs",
        "train.device",
        "train.progress",
        "train.log_every",
        "train.tensorboard",
        "train.tensorboard_views_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.knn_csv",
        "train.knn_every",
        "data.num_workers",
        "data.on_bad_file",
        "data.cache",
        "data.cache_dir",
        "data.cache_rate",
    }
)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    # a key added to byol3d after the old run was saved counts as its default there
    a.update({k: OPTIONS[k].default for k in b if k not in a and k in OPTIONS})
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)
    ]


class ConfigState:
    """Lets ignite's Checkpoint store the resolved config next to the weights."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(cfg)

    def state_dict(self) -> dict[str, Any]:
        return self.cfg

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cfg = dict(state)


def check_finite_weights(model: nn.Module, iteration: int) -> None:
    """Raise before a checkpoint would store NaN or Inf weights (one host sync)."""

    params = [p.detach() for p in model.parameters()]
    if params and not bool(torch.stack(torch._foreach_norm(params)).isfinite().all()):
        raise NonFiniteLossError(
            f"weights became NaN or Inf by iteration {iteration}; stopped before checkpointing them. "
            "The earlier checkpoints are intact; try a lower train.lr, train.amp=none or train.grad_clip"
        )


def apply_schedule(
    optimizer: torch.optim.Optimizer, lr_scheduler, schedule, train_cfg: Mapping[str, Any]
) -> None:
    """After loading a checkpoint: put the config's lr, weight decay, momentum and schedule back.

    A LambdaLR's state carries its multiplier object (with the old run's length) and the
    optimizer's state its old hyper-parameters; both would silently override the config.
    """
    lr_scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    lr_scheduler.base_lrs = [train_cfg["lr"]] * len(optimizer.param_groups)
    factor = schedule(lr_scheduler.last_epoch)
    for i, group in enumerate(optimizer.param_groups):  # see optim.param_groups: decay group first
        group["initial_lr"] = train_cfg["lr"]
        group["lr"] = train_cfg["lr"] * factor
        group["weight_decay"] = train_cfg["weight_decay"] if i == 0 else 0.0
        if "momentum" in group:
            group["momentum"] = train_cfg["momentum"]
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def check_ranks_agree(model: nn.Module) -> None:
    """Under DDP: every rank must hold the same weights, online and target (one all-gather).

    DDP averages gradients, so the online networks agree, and each rank applies the same EMA,
    so the targets do too; this checks it at the end of a run.
    """

    params = [p.detach().double() for p in model.parameters()]
    local = torch.stack(
        [
            torch.stack([p.sum() for p in params]).sum(),
            torch.stack([(p * p).sum() for p in params]).sum(),
        ]
    )
    gathered = idist.all_gather(local.to(idist.device())).view(-1, 2).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0):
        raise RuntimeError(f"ranks ended with different weights: checksums {gathered.tolist()}")
