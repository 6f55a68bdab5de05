"""The pieces :func:`byol3d.training.pretrain.pretrain` composes, each from explicit arguments.

In the order a run needs them (the run directory and resuming are
:mod:`byol3d.training.checkpoint`'s):

- :func:`process_device` - this process's device, seed and log level;
- :func:`build_model` - encoder -> BYOL -> speed options -> DDP;
- :func:`byol3d.training.files.training_files` - the file list (bad files skipped if asked)
  and its split; :func:`build_loaders` - datasets (cached as configured) and DataLoaders;
- :func:`build_optimization` - optimizer, warm-up + cosine schedule, LambdaLR;
- :func:`build_trainer` - the Ignite engine with AMP; :func:`attach_training`,
  :func:`attach_logging`, :func:`attach_evaluation` - its handlers, in one place.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import ThreadDataLoader
from torch import nn
from torch.utils.data import DataLoader

from byol3d.data.datasets import build_dataset
from byol3d.errors import ConfigError
from byol3d.models.byol import BYOL
from byol3d.models.encoders import build_encoder
from byol3d.training.accel import (
    DeviceViewLoader,
    apply_speed_options,
    device_views,
    memory_format,
)
from byol3d.training.distributed import is_main, make_loader, world_size, wrap_model
from byol3d.training.engine import (
    create_trainer,
    optimizer_steps,
    resolve_amp,
    resolve_device,
    unwrap,
)
from byol3d.training.handlers import (
    BatchPreview,
    KnnMonitor,
    MetricsLogger,
    Reseed,
    TargetUpdate,
    attach_epoch_log,
    tensorboard_writer,
)
from byol3d.training.optim import build_optimizer, warmup_cosine
from byol3d.transforms.batched import collate_boxes
from byol3d.transforms.batched_ops import MakeViewsCollate

logger = logging.getLogger("byol3d")


def process_device(device: str, seed: int) -> torch.device:
    """This process's device (its own GPU under DDP); rank 0 alone logs; torch seeded."""
    resolved = resolve_device(device)
    if world_size() > 1 and resolved.type == "cuda":
        resolved = idist.device()  # this process's GPU
    if resolved.type == "cuda":  # fixed shapes: let cuDNN pick each convolution's fastest kernel
        torch.backends.cudnn.benchmark = True
    if not is_main():
        logger.setLevel(logging.WARNING)  # rank 0 speaks for the run
    torch.manual_seed(seed)
    return resolved


def build_model(
    *,
    encoder: str,
    norm: str,
    hidden_layer: str,
    projection_dim: int,
    hidden_dim: int,
    dense_weight: float,
    dense_layer: str,
    dense_grid: int,
    separate_views: bool,
    swin_feature_size: int,
    swin_depths: Sequence[int],
    segresnet_init_filters: int,
    segresnet_blocks_down: Sequence[int],
    nnunet_plans: str | None,
    nnunet_configuration: str,
    spatial_dims: int,
    in_channels: int,
    roi_size: Sequence[int],
    device: torch.device,
    channels_last: bool,
    compile: bool,
    activation_checkpointing: bool,
    sync_bn: bool,
) -> nn.Module:
    """Encoder -> :class:`BYOL` on ``device`` -> speed options -> DDP when distributed.

    The ``model.*`` keys by name, plus the input geometry and the speed switches.

    Raises:
        ConfigError: a ``hidden_layer`` the encoder lacks, a ``roi_size`` it cannot take.
    """
    arch = {"swin_feature_size": swin_feature_size, "swin_depths": swin_depths,
            "segresnet_init_filters": segresnet_init_filters,
            "segresnet_blocks_down": segresnet_blocks_down, "nnunet_plans": nnunet_plans,
            "nnunet_configuration": nnunet_configuration}  # fmt: skip
    try:
        net = build_encoder(encoder, spatial_dims, in_channels, norm, **arch)
    except ValueError as err:  # plans that do not build, a missing optional package
        raise ConfigError(f"model.encoder {encoder!r}: {err}") from err
    try:
        model = BYOL(
            net.to(device),
            input_shape=(in_channels, *roi_size),
            hidden_layer=hidden_layer,
            projection_dim=projection_dim,
            hidden_dim=hidden_dim,
            dense_weight=dense_weight,
            dense_layer=dense_layer,
            dense_grid=dense_grid,
            separate_views=separate_views,
        )
    except ValueError as err:  # an unknown layer, a roi_size the encoder cannot take
        raise ConfigError(
            f"model.hidden_layer / model.dense_layer / transforms.roi_size: {err}"
        ) from err
    apply_speed_options(
        model,
        channels_last=channels_last,
        compile=compile,
        activation_checkpointing=activation_checkpointing,
        spatial_dims=spatial_dims,
    )
    # DDP (when distributed) before the optimizer: SyncBatchNorm replaces modules
    return wrap_model(
        model,
        sync_bn=sync_bn and device.type == "cuda",  # SyncBatchNorm is GPU-only
        find_unused_parameters=hidden_layer != "avgpool",
    )


def build_loaders(
    train_files: Sequence[str],
    val_files: Sequence[str],
    preprocess: Callable,
    train_views: Callable,
    val_views: Callable | None,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    gpu_views: bool,
    views: str = "cpu",
    views_device: str = "auto",
    roi_size: Sequence[int] = (),
    views_format: torch.memory_format | None = None,
    cache: str,
    cache_dir: str,
    cache_rate: float,
    num_workers: int,
    progress: bool,
) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (shuffled; GPU views in threads with ``gpu_views``) and the
    validation loader (None without ``val_files``).

    With ``views="batched"`` (``transforms.views``) the views are made per batch
    (:mod:`byol3d.transforms.batched_ops`): on a CUDA ``device`` with ``views_device="auto"``
    by a :class:`DeviceViewLoader` (in ``views_format``), otherwise in the DataLoader workers
    (:class:`MakeViewsCollate`).
    """
    if gpu_views and (device.type != "cuda" or world_size() > 1):
        raise ConfigError(
            "data.gpu_views needs train.device on one CUDA GPU (no DDP); set it false"
        )
    if gpu_views and views == "batched":
        raise ConfigError(
            "data.gpu_views and transforms.views batched exclude each other; pick one"
        )
    on_device = views == "batched" and views_device == "auto" and device.type == "cuda"
    collate = (
        None if views != "batched" else collate_boxes if on_device else MakeViewsCollate(roi_size)
    )

    def finish(loader):
        return (
            DeviceViewLoader(loader, roi_size, device, memory_format=views_format)
            if on_device
            else loader
        )

    dataset_kwargs = {"cache": cache, "cache_dir": cache_dir, "cache_rate": cache_rate,
                      "num_workers": num_workers, "progress": progress}  # fmt: skip
    # a persistent cache is written by rank 0 first, then read by the others (MONAI#2374)
    rank_0_first = idist.one_rank_first if cache == "persistent" else contextlib.nullcontext
    views_in_ds = device_views(train_views, device) if gpu_views else train_views
    with rank_0_first():
        train_ds = build_dataset(train_files, preprocess, views_in_ds, **dataset_kwargs)
    loader_kwargs = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "seed": seed,
                     "collate_fn": collate}  # fmt: skip
    drop_last = len(train_ds) >= batch_size * world_size()
    if gpu_views:  # GPU tensors stay in this process: threads, not worker processes
        train_loader = ThreadDataLoader(
            train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, num_workers=0
        )
    else:
        train_loader = finish(
            make_loader(train_ds, batch_size, shuffle=True, drop_last=drop_last, **loader_kwargs)
        )
    if len(train_ds) < batch_size:
        logger.warning(
            "only %d training volumes for train.batch_size %d: each epoch is one smaller batch",
            len(train_ds),
            batch_size,
        )
    if not val_files:
        return train_loader, None
    with rank_0_first():
        val_ds = build_dataset(val_files, preprocess, val_views, **dataset_kwargs)
    return train_loader, finish(
        make_loader(val_ds, batch_size, shuffle=False, drop_last=False, **loader_kwargs)
    )


def build_optimization(
    model: nn.Module,
    *,
    steps_per_epoch: int,
    optimizer: str,
    lr: float,
    min_lr: float,
    weight_decay: float,
    momentum: float,
    warmup_epochs: float,
    max_epochs: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, warmup_cosine]:
    """The optimizer (wrapped by ``idist.auto_optim``), its warm-up + cosine schedule and
    the ``LambdaLR`` that applies it per optimizer step."""
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
    opt = idist.auto_optim(opt)  # unchanged for native DDP; wraps for Horovod/XLA
    schedule = warmup_cosine(
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        total_steps=max_epochs * steps_per_epoch,
        min_ratio=min_lr / lr,
    )
    # a copy: loading a LambdaLR state writes the saved run's schedule into its multiplier object
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, copy.copy(schedule)), schedule


def build_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    amp: str,
    accumulate_steps: int,
    grad_clip: float | None,
    channels_last: bool,
    spatial_dims: int,
) -> tuple[Engine, torch.dtype | None, torch.amp.GradScaler | None]:
    """The Ignite trainer, its autocast dtype and (for fp16) its gradient scaler."""
    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    trainer = create_trainer(
        model,
        optimizer,
        device=device,
        lr_scheduler=lr_scheduler,
        amp_dtype=amp_dtype,
        scaler=scaler,
        accumulate_steps=accumulate_steps,
        grad_clip=grad_clip,
        memory_format=memory_format(spatial_dims) if channels_last else None,
    )
    return trainer, amp_dtype, scaler


def attach_training(
    trainer: Engine,
    model: nn.Module,
    train_loader: DataLoader,
    train_views: Callable,
    *,
    seed: int,
    base_tau: float,
) -> None:
    """Per-epoch reseeding of the views and the sampler; the target's EMA update."""
    Reseed(seed, [train_views]).attach(trainer)
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler, SeededSampler
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch))
    TargetUpdate(model, base_tau=base_tau).attach(trainer)


def attach_logging(
    trainer: Engine,
    cfg: Mapping[str, Any],
    out: Path,
    *,
    tensorboard: bool,
    log_every: int,
    dense: bool,
    views_every: int,
    progress: bool,
):
    """metrics.csv (and TensorBoard scalars and views), the progress bar; returns the writer."""
    writer = tensorboard_writer(tensorboard and is_main(), out / "tensorboard")
    extra = ("dense",) if dense else ()
    MetricsLogger(
        out / "metrics.csv", log_every=log_every, writer=writer, extra_columns=extra
    ).attach(trainer)
    if writer is not None and views_every > 0:  # rank 0 only: the writer lives there
        BatchPreview(writer, every=views_every).attach(trainer)
    if progress and is_main():
        attach_progress_bar(trainer)
    return writer


class _BarLoss:
    """Puts the latest flushed loss on the progress bar (none until the first flush).

    The loss reaches ``engine.state.metrics`` only when :class:`MetricsLogger` flushes (every
    ``log_every`` iterations and at the epoch's end, the only host syncs): a bar reading the
    metric itself showed a placeholder NaN until then, and ended each epoch on the value from
    before the epoch's last flush.
    """

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.metrics.get("loss")
        if self.bar.pbar is not None and loss is not None:
            self.bar.pbar.set_postfix(loss=f"{loss:.4g}", refresh=False)


def attach_progress_bar(trainer: Engine) -> ProgressBar:
    """A tqdm bar per epoch showing the loss as last flushed by the metrics logger."""
    bar = ProgressBar(persist=True)
    show = _BarLoss(bar)
    # before the bar's own handlers: the epoch's final flush is shown before the bar closes
    trainer.add_event_handler(Events.ITERATION_COMPLETED, show)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, show)
    bar.attach(trainer)
    return bar


def attach_evaluation(
    trainer: Engine,
    model: nn.Module,
    out: Path,
    val_loader: DataLoader | None,
    val_views: Callable | None,
    *,
    preprocess: Callable,
    roi_size: Sequence[int],
    knn_csv: str | None,
    knn_every: int,
    channels: list[str] | None = None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    seed: int,
    writer,
    memory_format: torch.memory_format | None = None,
) -> None:
    """The online kNN monitor (with ``knn_csv``; on every rank, each embedding its share) and
    epochs.csv with the validation loss (with the training step's autocast and memory format)."""
    knn = bool(knn_csv)
    if knn:  # before the epoch log, which writes its result
        KnnMonitor(unwrap(model).encoder, knn_csv, preprocess, roi_size, every=knn_every,
                   device=device, writer=writer, channels=channels, amp_dtype=amp_dtype,
                   memory_format=memory_format).attach(trainer)  # fmt: skip
    attach_epoch_log(trainer, model, out / "epochs.csv", val_loader, val_views, device,
                     amp_dtype, seed, writer, knn=knn, memory_format=memory_format)  # fmt: skip


def steps_per_epoch(train_loader: DataLoader, accumulate_steps: int) -> int:
    """Optimizer steps in one epoch of ``train_loader``."""
    return optimizer_steps(len(train_loader), len(train_loader), accumulate_steps)
