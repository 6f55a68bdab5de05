"""The run directory: checkpoints, encoder.pt, logs; reading them back safely.

    OUTPUT_DIR/config.yaml                 the resolved config
    OUTPUT_DIR/checkpoints/checkpoint_<epoch>.pt
    OUTPUT_DIR/metrics.csv, epochs.csv     per-iteration and per-epoch logs
    OUTPUT_DIR/encoder.pt                  the online encoder's plain state_dict, on CPU

Every write is atomic (a temporary file in the same folder, then ``os.replace``), so a run
killed mid-write leaves the previous file intact. Checkpoints are read with
``torch.load(..., weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byol3d.config import OPTIONS, flatten
from byol3d.errors import CheckpointError

__all__ = [
    "RESUMABLE_KEYS",
    "ConfigState",
    "apply_schedule",
    "atomic_save",
    "check_finite_weights",
    "check_ranks_agree",
    "config_changes",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_encoder",
    "truncate_log",
]

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
_CKPT = re.compile(r"checkpoint_(\d+)\.pt$")


def _checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``checkpoints/checkpoint_<epoch>.pt``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    return sorted(
        (int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := _CKPT.search(p.name))
    )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest epoch in ``output_dir/checkpoints``, or None."""
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a one-line error for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of foreign objects, ...
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


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


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_log(path: Path, iteration: int) -> None:
    """Keep the header and the rows of ``path`` (a CSV with an ``iteration`` column) up to ``iteration``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    column = lines[0].rstrip("\n").split(",").index("iteration")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.strip() and int(line.split(",")[column]) <= iteration
    ]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def save_encoder(encoder: nn.Module, path: Path) -> None:
    """Write ``encoder``'s state_dict with every tensor on CPU (loads on machines without a GPU)."""
    atomic_save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, path)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (by epoch) in ``output_dir/checkpoints``.

    Runs only after a new checkpoint was written, so a run that fails never removes one.
    """
    found = _checkpoints(output_dir)
    for _epoch, path in found[: max(0, len(found) - keep)]:
        path.unlink(missing_ok=True)


def check_finite_weights(model: nn.Module, iteration: int) -> None:
    """Raise before a checkpoint would store NaN or Inf weights (one host sync)."""
    from byol3d.engine import NonFiniteLossError

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
    import ignite.distributed as idist

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
