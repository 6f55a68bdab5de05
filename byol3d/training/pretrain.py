"""``byol3d pretrain``: a config in, a run directory with a pretrained encoder out.

    byol3d pretrain configs/ct_resnet50.yaml data.root=/data/ct output_dir=runs/ct
    byol3d pretrain configs/demo_ct.yaml train.max_epochs=10   # raise epochs: resumes the run

Wires the pieces in the order data flows: files (:mod:`byol3d.data`) -> deterministic
preprocessing and two views (:mod:`byol3d.transforms`) -> encoder and BYOL model
(:mod:`byol3d.networks`, :mod:`byol3d.byol`) -> Ignite trainer (:mod:`byol3d.engine`) ->
the run directory:

    OUTPUT_DIR/config.yaml        the resolved config
    OUTPUT_DIR/checkpoints/       checkpoint_<epoch>.pt: model, target, optimizer, scheduler, trainer, config
    OUTPUT_DIR/metrics.csv        per iteration: iteration, epoch, loss, tau, lr, collapse
    OUTPUT_DIR/epochs.csv         per epoch: epoch, iteration, train_loss, val_loss, seconds
    OUTPUT_DIR/encoder.pt         the online encoder's plain state_dict (build_encoder(...) loads it strictly)

Re-running the same command on an OUTPUT_DIR with a checkpoint resumes from its latest one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from monai.data import ThreadDataLoader
from torch.utils.data import DistributedSampler

from byol3d.config import dump_config
from byol3d.data.datasets import build_dataset, check_files
from byol3d.data.discovery import list_images, split_train_val
from byol3d.errors import CheckpointError, ConfigError, DataError
from byol3d.models.byol import BYOL
from byol3d.models.encoders import build_encoder
from byol3d.rundir import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_encoder,
    truncate_log,
)
from byol3d.training.accel import (
    apply_speed_options,
    device_views,
    memory_format,
    resolve_channels_last,
)
from byol3d.training.checkpoint import (
    ConfigState,
    apply_schedule,
    check_finite_weights,
    check_ranks_agree,
    config_changes,
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
    KnnMonitor,
    MetricsLogger,
    Reseed,
    TargetUpdate,
    attach_epoch_log,
    every_epochs,
    plot_and_summarize,
    tensorboard_writer,
    views_to_tensorboard,
)
from byol3d.training.optim import build_optimizer, warmup_cosine
from byol3d.transforms import build_transforms

logger = logging.getLogger("byol3d")


@dataclass
class RunResult:
    """What a finished ``pretrain`` left behind."""

    output_dir: Path
    encoder_path: Path
    checkpoint: Path | None
    metrics_path: Path
    epochs: int
    iterations: int
    resumed_from: Path | None


def pretrain(cfg: Mapping[str, Any], allow_config_change: bool = False) -> RunResult:
    """Run (or resume) BYOL pretraining as configured; see the module docstring for the outputs.

    Args:
        cfg: a validated config from :func:`byol3d.config.load_config`.
        allow_config_change: resume from an existing checkpoint even when keys other than
            :data:`byol3d.rundir.RESUMABLE_KEYS` changed (otherwise a ConfigError lists them).
    """
    data_cfg, model_cfg, tf_cfg, train_cfg = (
        cfg[s] for s in ("data", "model", "transforms", "train")
    )
    if not data_cfg["root"] and not data_cfg["csv"]:
        raise ConfigError(
            "data.root is not set: give the data folder, e.g. data.root=/data/ct, or a CSV list, data.csv=..."
        )
    out = Path(cfg["output_dir"])
    ckpt_dir = out / "checkpoints"
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

    # transforms, then the model, then the files: the cheap checks fail first
    roi = list(tf_cfg["roi_size"])
    preprocess, train_views = build_transforms(cfg)
    # encoder -> BYOL (before the data: a bad layer name or crop size fails in seconds, not after caching)
    device = resolve_device(train_cfg["device"])
    if world_size() > 1 and device.type == "cuda":
        device = idist.device()  # this process's GPU
    if not is_main():
        logger.setLevel(logging.WARNING)  # rank 0 speaks for the run
    torch.manual_seed(cfg["seed"])
    encoder = build_encoder(
        model_cfg["encoder"],
        spatial_dims=data_cfg["spatial_dims"],
        in_channels=data_cfg["in_channels"],
        norm=model_cfg["norm"],
    ).to(device)
    try:
        model = BYOL(
            encoder,
            input_shape=(data_cfg["in_channels"], *roi),
            hidden_layer=model_cfg["hidden_layer"],
            projection_dim=model_cfg["projection_dim"],
            hidden_dim=model_cfg["hidden_dim"],
            dense_weight=model_cfg["dense_weight"],
            dense_layer=model_cfg["dense_layer"],
            dense_grid=model_cfg["dense_grid"],
        )
    except ValueError as err:  # an unknown hidden_layer, a roi_size the encoder cannot take
        raise ConfigError(f"model.hidden_layer / transforms.roi_size: {err}") from err
    channels_last = resolve_channels_last(train_cfg["channels_last"], device)
    apply_speed_options(
        model,
        channels_last=channels_last,
        compile=train_cfg["compile"],
        activation_checkpointing=train_cfg["activation_checkpointing"],
        spatial_dims=data_cfg["spatial_dims"],
    )
    # DDP (when distributed) before the optimizer: SyncBatchNorm replaces modules
    model = wrap_model(
        model,
        sync_bn=train_cfg["sync_bn"] and device.type == "cuda",  # SyncBatchNorm is GPU-only
        find_unused_parameters=model_cfg["hidden_layer"] != "avgpool",
    )

    files = list_images(
        data_cfg["root"],
        csv=data_cfg["csv"],
        spatial_dims=data_cfg["spatial_dims"],
        dicom=data_cfg["dicom"],
    )
    if data_cfg["on_bad_file"] == "skip":
        files = _skip_bad_files(files, preprocess, data_cfg["num_workers"], out)
    train_files, val_files = split_train_val(files, data_cfg["val_fraction"], seed=cfg["seed"])
    dataset_kwargs = {
        "cache": data_cfg["cache"],
        "cache_dir": data_cfg["cache_dir"] or str(out / "cache"),
        "cache_rate": data_cfg["cache_rate"],
        "num_workers": data_cfg["num_workers"],
        "progress": train_cfg["progress"],
    }
    logger.info(
        "data: %d images from %s (%d train, %d validation)",
        len(files),
        data_cfg["csv"] or data_cfg["root"],
        len(train_files),
        len(val_files),
    )
    # a persistent cache is written by rank 0 first, then read by the others (MONAI#2374)
    rank_0_first = (
        idist.one_rank_first if data_cfg["cache"] == "persistent" else contextlib.nullcontext
    )
    gpu_views = data_cfg["gpu_views"]
    if gpu_views and (device.type != "cuda" or world_size() > 1):
        raise ConfigError(
            "data.gpu_views needs train.device on one CUDA GPU (no DDP); set it false"
        )
    views_in_ds = device_views(train_views, device) if gpu_views else train_views
    with rank_0_first():
        train_ds = build_dataset(train_files, preprocess, views_in_ds, **dataset_kwargs)
    batch_size = train_cfg["batch_size"]
    loader_kwargs = {
        "num_workers": data_cfg["num_workers"],
        "pin_memory": device.type == "cuda",
        "seed": cfg["seed"],
    }
    drop_last = len(train_ds) >= batch_size * world_size()
    if gpu_views:  # GPU tensors stay in this process: threads, not worker processes
        train_loader = ThreadDataLoader(
            train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, num_workers=0
        )
    else:
        train_loader = make_loader(
            train_ds, batch_size, shuffle=True, drop_last=drop_last, **loader_kwargs
        )
    if len(train_ds) < batch_size:
        logger.warning(
            "only %d training volumes for train.batch_size %d: each epoch is one smaller batch",
            len(train_ds),
            batch_size,
        )
    val_loader, val_views = None, None
    if val_files:
        val_views = build_transforms(cfg)[1]
        with rank_0_first():
            val_ds = build_dataset(val_files, preprocess, val_views, **dataset_kwargs)
        val_loader = make_loader(
            val_ds, batch_size, shuffle=False, drop_last=False, **loader_kwargs
        )

    # engine
    accumulate = train_cfg["accumulate_steps"]
    steps_per_epoch = optimizer_steps(len(train_loader), len(train_loader), accumulate)
    optimizer = build_optimizer(
        model,
        train_cfg["optimizer"],
        lr=train_cfg["lr"],
        weight_decay=train_cfg["weight_decay"],
        momentum=train_cfg["momentum"],
    )
    optimizer = idist.auto_optim(optimizer)  # unchanged for native DDP; wraps for Horovod/XLA
    schedule = warmup_cosine(
        warmup_steps=round(train_cfg["warmup_epochs"] * steps_per_epoch),
        total_steps=train_cfg["max_epochs"] * steps_per_epoch,
        min_ratio=train_cfg["min_lr"] / train_cfg["lr"],
    )
    # a copy: loading a LambdaLR state writes the saved run's schedule into its multiplier object
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, copy.copy(schedule))
    amp_dtype = resolve_amp(train_cfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    trainer = create_trainer(
        model,
        optimizer,
        device=device,
        lr_scheduler=lr_scheduler,
        amp_dtype=amp_dtype,
        scaler=scaler,
        accumulate_steps=accumulate,
        grad_clip=train_cfg["grad_clip"],
        memory_format=memory_format(data_cfg["spatial_dims"]) if channels_last else None,
    )
    Reseed(cfg["seed"], [train_views]).attach(trainer)
    if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
        trainer.add_event_handler(
            Events.EPOCH_STARTED, lambda e: train_loader.sampler.set_epoch(e.state.epoch)
        )
    TargetUpdate(model, base_tau=train_cfg["base_tau"]).attach(trainer)
    writer = tensorboard_writer(train_cfg["tensorboard"] and is_main(), out / "tensorboard")
    MetricsLogger(
        out / "metrics.csv",
        log_every=train_cfg["log_every"],
        writer=writer,
        extra_columns=("dense",) if model_cfg["dense_weight"] > 0 else (),
    ).attach(trainer)
    views_every = train_cfg["tensorboard_views_every"]
    if writer is not None and views_every > 0:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(every=views_every),
            lambda e: views_to_tensorboard(writer, cfg, e),
        )
    if train_cfg["progress"] and is_main():
        trainer.add_event_handler(
            Events.STARTED, lambda e: e.state.metrics.setdefault("loss", float("nan"))
        )
        ProgressBar(persist=True).attach(trainer, metric_names=["loss"])
    knn = bool(train_cfg["knn_csv"]) and is_main()
    if knn:  # before the epoch log, which writes its result
        KnnMonitor(unwrap(model).encoder, train_cfg["knn_csv"], preprocess, roi,
                   every=train_cfg["knn_every"], device=device, writer=writer).attach(trainer)  # fmt: skip
    attach_epoch_log(
        trainer,
        model,
        out / "epochs.csv",
        val_loader,
        val_views,
        device,
        amp_dtype,
        cfg["seed"],
        writer,
        knn=knn,
    )

    to_save = {
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "trainer": trainer,
        "config": ConfigState(cfg),
    }
    if scaler is not None:
        to_save["scaler"] = scaler
    saver = Checkpoint(
        to_save,
        DiskSaver(ckpt_dir, require_empty=False, atomic=True, save_on_rank=0),
        n_saved=None,  # pruned below, across resumes too
        global_step_transform=lambda engine, _event: engine.state.epoch,
    )
    save_event = Events.EPOCH_COMPLETED(event_filter=every_epochs(train_cfg["checkpoint_every"]))
    encoder_path = out / "encoder.pt"
    trainer.add_event_handler(
        save_event, lambda _e: check_finite_weights(model, _e.state.iteration)
    )
    trainer.add_event_handler(save_event, saver)
    if is_main():
        trainer.add_event_handler(
            save_event, lambda _e: save_encoder(unwrap(model).encoder, encoder_path)
        )
        trainer.add_event_handler(
            save_event, lambda _e: prune_checkpoints(out, train_cfg["keep_checkpoints"])
        )

    if checkpoint is not None:
        saved_length = checkpoint.get("trainer", {}).get("epoch_length")
        if saved_length is not None and saved_length != len(train_loader):
            raise ConfigError(
                f"the data changed since checkpoint {str(resume_from)!r}: an epoch was {saved_length} "
                f"iterations, now {len(train_loader)}; use a new output_dir"
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
        apply_schedule(optimizer, lr_scheduler, schedule, train_cfg)
        logger.info(
            "resuming from %s (epoch %d, iteration %d)",
            resume_from,
            trainer.state.epoch,
            trainer.state.iteration,
        )
        # rows logged after that checkpoint by the interrupted run are replaced by the resumed ones
        if is_main():
            for log in (out / "metrics.csv", out / "epochs.csv"):
                truncate_log(log, trainer.state.iteration)
    if is_main():
        (out / "config.yaml").write_text(dump_config(cfg))
    done = trainer.state.epoch >= train_cfg["max_epochs"]
    if done:  # ignite would restart a finished run from scratch: never overwrite it
        logger.info(
            "the run in %s already reached epoch %d; raise train.max_epochs to train longer",
            out,
            trainer.state.epoch,
        )
    else:
        trainer.run(train_loader, max_epochs=train_cfg["max_epochs"])
    if writer is not None:
        writer.close()
    if world_size() > 1:
        check_ranks_agree(model)
    if is_main():
        save_encoder(unwrap(model).encoder, encoder_path)
        plot_and_summarize(out)
    return RunResult(
        output_dir=out,
        encoder_path=encoder_path,
        checkpoint=latest_checkpoint(out),
        metrics_path=out / "metrics.csv",
        epochs=trainer.state.epoch,
        iterations=trainer.state.iteration,
        resumed_from=resume_from,
    )


def _skip_bad_files(files: list[str], preprocess, num_workers: int, out: Path) -> list[str]:
    """``data.on_bad_file: skip``: drop unusable files, warn, list them in skipped_files.txt."""
    good, bad = check_files(files, preprocess, num_workers=num_workers)
    if bad and is_main():
        listing = out / "skipped_files.txt"
        listing.write_text("".join(f"{path}\t{problem}\n" for path, problem in bad))
        logger.warning(
            "skipped %d of %d files that cannot be used (listed in %s), e.g. %s",
            len(bad),
            len(files),
            listing,
            bad[0][1],
        )
    if not good:
        raise DataError(
            f"none of the {len(files)} files under data.root can be used, e.g. {bad[0][1]}"
        )
    return good
