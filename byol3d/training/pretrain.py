"""``byol3d pretrain``: a config in, a run directory with a pretrained encoder out.

    byol3d pretrain configs/ct_resnet50.yaml data.root=/data/ct output_dir=runs/ct
    byol3d pretrain configs/demo_ct.yaml train.max_epochs=10   # raise epochs: resumes the run

Wires the pieces in the order data flows: files (:mod:`byol3d.data`) -> deterministic
preprocessing and two views (:mod:`byol3d.transforms`) -> encoder and BYOL model
(:mod:`byol3d.models`) -> Ignite trainer and handlers (:mod:`byol3d.training.engine`,
:mod:`byol3d.training.handlers`) -> the run directory (:mod:`byol3d.rundir`). Each step is
a builder of :mod:`byol3d.training.builders` (the file list:
:mod:`byol3d.training.files`); this function only composes them:

    OUTPUT_DIR/config.yaml        the resolved config
    OUTPUT_DIR/checkpoints/       checkpoint_<epoch>.pt: model, target, optimizer, scheduler, trainer, config
    OUTPUT_DIR/metrics.csv        per iteration: iteration, epoch, loss, tau, lr, collapse
    OUTPUT_DIR/epochs.csv         per epoch: epoch, iteration, train_loss, val_loss, seconds
    OUTPUT_DIR/encoder.pt         the online encoder's plain state_dict (build_encoder(...) loads it strictly)

Re-running the same command on an OUTPUT_DIR with a checkpoint resumes from its latest one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byol3d.config import dump_config
from byol3d.data.sanity import forget_notes, report_noted
from byol3d.rundir import latest_checkpoint, save_encoder
from byol3d.training.accel import memory_format, resolve_channels_last
from byol3d.training.builders import (
    attach_evaluation,
    attach_logging,
    attach_training,
    build_loaders,
    build_model,
    build_optimization,
    build_trainer,
    process_device,
    steps_per_epoch,
)
from byol3d.training.checkpoint import (
    attach_checkpointing,
    check_ranks_agree,
    open_run,
    restore,
    training_state,
)
from byol3d.training.distributed import is_main, world_size
from byol3d.training.engine import unwrap
from byol3d.training.files import training_files
from byol3d.training.handlers import plot_and_summarize
from byol3d.transforms import build_eval_transform, build_transforms, store_folder

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
    summary: str = ""  # the end-of-run summary for the terminal (losses, collapse, paths)


def pretrain(cfg: Mapping[str, Any], allow_config_change: bool = False) -> RunResult:
    """Run (or resume) BYOL pretraining as configured; see the module docstring for the outputs.

    Args:
        cfg: a validated config from :func:`byol3d.config.load_config`.
        allow_config_change: resume from an existing checkpoint even when keys other than
            :data:`byol3d.training.checkpoint.RESUMABLE_KEYS` changed (otherwise a
            ConfigError lists them).
    """
    data, model_cfg, train = cfg["data"], cfg["model"], cfg["train"]
    out, roi, seed = Path(cfg["output_dir"]), list(cfg["transforms"]["roi_size"]), cfg["seed"]
    resume_from, checkpoint = open_run(cfg, out, allow_config_change)
    forget_notes()  # the data warnings of this run: once per file, then counted
    # transforms, then the model, then the files: the cheap checks fail first (a bad layer
    # name or crop size fails in seconds, not after caching)
    preprocess, train_views = build_transforms(cfg)
    device = process_device(train["device"], seed)
    channels_last = resolve_channels_last(train["channels_last"], device)
    model = build_model(**model_cfg, spatial_dims=data["spatial_dims"],
                        in_channels=data["in_channels"], roi_size=roi, device=device,
                        channels_last=channels_last, compile=train["compile"],
                        activation_checkpointing=train["activation_checkpointing"],
                        sync_bn=train["sync_bn"])  # fmt: skip
    cache_dir = str(store_folder(cfg)) if data["cache"] == "store" else data["cache_dir"] or str(out / "cache")  # fmt: skip
    train_files, val_files = training_files(
        **{k: data[k] for k in ("root", "csv", "spatial_dims", "dicom", "channels", "channel_patterns",
                                "min_frame_std", "on_bad_file", "val_fraction", "num_workers", "cache")},
        seed=seed, preprocess=preprocess, out=out, store_dir=cache_dir, progress=train["progress"],
    )  # fmt: skip
    val_views = build_transforms(cfg)[1] if val_files else None
    train_loader, val_loader = build_loaders(
        train_files, val_files, preprocess, train_views, val_views,
        **{k: data[k] for k in ("gpu_views", "cache", "cache_rate", "num_workers")},
        cache_dir=cache_dir, batch_size=train["batch_size"],
        device=device, seed=seed, progress=train["progress"], roi_size=roi,
        views=cfg["transforms"]["views"], views_device=cfg["transforms"]["device"],
        views_format=memory_format(data["spatial_dims"]) if channels_last else None,
    )  # fmt: skip
    report_noted()  # files read so far (all of them with a RAM cache or on_bad_file: skip)
    optimizer, lr_scheduler, schedule = build_optimization(
        model, steps_per_epoch=steps_per_epoch(train_loader, train["accumulate_steps"]),
        **{k: train[k] for k in ("optimizer", "lr", "min_lr", "weight_decay", "momentum",
                                 "warmup_epochs", "max_epochs")},
    )  # fmt: skip
    trainer, amp_dtype, scaler = build_trainer(
        model, optimizer, lr_scheduler, device=device, channels_last=channels_last,
        spatial_dims=data["spatial_dims"],
        **{k: train[k] for k in ("amp", "accumulate_steps", "grad_clip")},
    )  # fmt: skip
    attach_training(trainer, model, train_loader, train_views, seed=seed, base_tau=train["base_tau"])  # fmt: skip
    writer = attach_logging(trainer, cfg, out, tensorboard=train["tensorboard"],
                            log_every=train["log_every"], dense=model_cfg["dense_weight"] > 0,
                            views_every=train["tensorboard_views_every"],
                            progress=train["progress"])  # fmt: skip
    # the kNN monitor sees what evaluation sees: the views' input without the augmentations
    attach_evaluation(trainer, model, out, val_loader, val_views, preprocess=build_eval_transform(cfg),
                      roi_size=roi, knn_csv=train["knn_csv"], knn_every=train["knn_every"], channels=data["channels"],
                      device=device, amp_dtype=amp_dtype, seed=seed, writer=writer,
                      memory_format=memory_format(data["spatial_dims"]) if channels_last else None)  # fmt: skip
    to_save = training_state(model, optimizer, lr_scheduler, trainer, scaler, cfg)
    attach_checkpointing(trainer, to_save, out, checkpoint_every=train["checkpoint_every"],
                         keep_checkpoints=train["keep_checkpoints"])  # fmt: skip
    if checkpoint is not None:
        restore(to_save, checkpoint, resume_from, epoch_length=len(train_loader),
                schedule=schedule, train_cfg=train, out=out)  # fmt: skip
    if is_main():
        (out / "config.yaml").write_text(dump_config(cfg))
    if trainer.state.epoch >= train["max_epochs"]:  # ignite would restart a finished run: never
        logger.info("the run in %s already reached epoch %d; raise train.max_epochs to train longer",
                    out, trainer.state.epoch)  # fmt: skip
    else:
        trainer.run(train_loader, max_epochs=train["max_epochs"])
    if writer is not None:
        writer.close()
    if world_size() > 1:
        check_ranks_agree(model)
    summary = None
    if is_main():
        save_encoder(unwrap(model).encoder, out / "encoder.pt")
        summary = plot_and_summarize(out)
    latest = latest_checkpoint(out)
    if summary is None:  # no plot: the paths at least
        summary = (f"byol3d: trained {trainer.state.epoch} epochs ({trainer.state.iteration} iterations) in {out}\n"
                   f"  encoder:     {out / 'encoder.pt'}\n  checkpoint:  {latest or 'none'}\n"
                   f"  metrics:     {out / 'metrics.csv'}, {out / 'epochs.csv'}")  # fmt: skip
    return RunResult(output_dir=out, encoder_path=out / "encoder.pt",
                     checkpoint=latest, metrics_path=out / "metrics.csv",
                     epochs=trainer.state.epoch, iterations=trainer.state.iteration,
                     resumed_from=resume_from, summary=summary)  # fmt: skip
