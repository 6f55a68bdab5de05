"""Checkpointing and resuming a run: what is saved, when, and how a resumed run takes it back.

- :func:`open_run`: the latest checkpoint of ``OUTPUT_DIR`` (files: :mod:`byol3d.rundir`),
  refused when the config changed in a key outside :data:`RESUMABLE_KEYS`
  (:func:`config_changes`);
- :func:`training_state` and :func:`attach_checkpointing`: model, target, optimizer, scheduler,
  trainer and the resolved config (:class:`ConfigState`) every ``train.checkpoint_every``
  epochs, after :func:`check_finite_weights`; ``encoder.pt`` with them; old ones pruned;
- :func:`restore` and :func:`apply_schedule`: load a checkpoint, then let the config's lr and
  schedule (and a raised ``train.max_epochs``) take over;
- :func:`check_ranks_agree`: under DDP, every rank ends with the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from byol3d.config import OPTIONS, flatten
from byol3d.errors import CheckpointError, ConfigError, NonFiniteLossError
from byol3d.rundir import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_encoder,
    truncate_log,
)
from byol3d.training.distributed import is_main
from byol3d.training.engine import unwrap
from byol3d.training.handlers import every_epochs
from byol3d.training.optim import warmup_cosine

logger = logging.getLogger("byol3d")

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
        "transforms.device",
    }
)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key outside :data:`RESUMABLE_KEYS` that differs."""
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


def open_run(
    cfg: Mapping[str, Any], out: Path, allow_config_change: bool = False
) -> tuple[Path | None, dict | None]:
    """The latest checkpoint in ``out`` and its contents (``(None, None)`` for a new run).

    Raises:
        ConfigError: no data source; the checkpoint's config differs in a key that changes
            what is learnt (unless ``allow_config_change``); ``out`` cannot be created.
    """
    if not cfg["data"]["root"] and not cfg["data"]["csv"]:
        raise ConfigError(
            "data.root is not set: give the data folder, e.g. data.root=/data/ct, or a CSV list, data.csv=..."
        )
    resume_from = latest_checkpoint(out)
    checkpoint = None
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        changes = config_changes(checkpoint.get("config", {}), cfg)
        if changes and not allow_config_change:
            raise ConfigError(
                f"output_dir {str(out)!r} holds a run with another config ({'; '.join(changes)}); "
                "use a new output_dir, or --allow-config-change to resume it with these values"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output_dir {str(out)!r}: {err.strerror or err}") from err
    return resume_from, checkpoint


def attach_checkpointing(
    trainer: Engine,
    to_save: dict[str, Any],
    out: Path,
    *,
    checkpoint_every: int,
    keep_checkpoints: int,
) -> None:
    """Every ``checkpoint_every`` epochs (and at the last): weights checked finite, then
    ``checkpoints/checkpoint_<epoch>.pt`` of ``to_save``, ``encoder.pt``, old ones pruned."""
    model = to_save["model"]
    saver = Checkpoint(
        to_save,
        DiskSaver(out / "checkpoints", require_empty=False, atomic=True, save_on_rank=0),
        n_saved=None,  # pruned below, across resumes too
        global_step_transform=lambda engine, _event: engine.state.epoch,
    )
    save_event = Events.EPOCH_COMPLETED(event_filter=every_epochs(checkpoint_every))
    trainer.add_event_handler(save_event, lambda e: check_finite_weights(model, e.state.iteration))
    trainer.add_event_handler(save_event, saver)
    if is_main():
        encoder_path = out / "encoder.pt"
        trainer.add_event_handler(
            save_event, lambda _e: save_encoder(unwrap(model).encoder, encoder_path)
        )
        trainer.add_event_handler(save_event, lambda _e: prune_checkpoints(out, keep_checkpoints))


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer: Engine,
    scaler: torch.amp.GradScaler | None,
    cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """What a checkpoint holds: model, optimizer, scheduler, trainer, config (and scaler)."""
    state = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
             "trainer": trainer, "config": ConfigState(cfg)}  # fmt: skip
    if scaler is not None:
        state["scaler"] = scaler
    return state


def restore(
    to_save: dict[str, Any],
    checkpoint: Mapping[str, Any],
    resume_from: Path,
    *,
    epoch_length: int,
    schedule: warmup_cosine,
    train_cfg: Mapping[str, Any],
    out: Path,
) -> None:
    """Load a checkpoint into the run's objects; the config's lr and schedule take over.

    Raises:
        ConfigError: the data changed (another number of iterations per epoch).
        CheckpointError: the checkpoint does not fit this model.
    """
    saved_length = checkpoint.get("trainer", {}).get("epoch_length")
    if saved_length is not None and saved_length != epoch_length:
        raise ConfigError(
            f"the data changed since checkpoint {str(resume_from)!r}: an epoch was {saved_length} "
            f"iterations, now {epoch_length}; use a new output_dir"
        )
    to_load = {k: v for k, v in to_save.items() if k != "config" and k in checkpoint}
    try:
        Checkpoint.load_objects(to_load, checkpoint)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(resume_from)!r} does not fit this model: {str(err).splitlines()[0]}"
        ) from err
    # the saved optimizer and scheduler carry the old lr, decay and schedule length: the
    # config's values (and a raised max_epochs) take over from the resumed step on
    apply_schedule(to_save["optimizer"], to_save["lr_scheduler"], schedule, train_cfg)
    state = to_save["trainer"].state
    logger.info("resuming from %s (epoch %d, iteration %d)", resume_from, state.epoch, state.iteration)  # fmt: skip
    # rows logged after that checkpoint by the interrupted run are replaced by the resumed ones
    if is_main():
        for log in (out / "metrics.csv", out / "epochs.csv"):
            truncate_log(log, state.iteration)
