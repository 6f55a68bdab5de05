"""Training-step part of scripts/benchmark.py: byol3d's Ignite trainer and its peers, side by side.

Every side gets the same MONAI encoder (:func:`byol3d.build_encoder`), the same head sizes,
AdamW with the same lr and weight decay, the same device and the same input batches, already
in memory on that device. Each side is a ``run(batches)`` callable doing one optimizer step
per batch exactly as its library's documentation writes the loop.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from byol3d import BYOL, build_encoder
from byol3d.models.byol import cosine_tau
from byol3d.training.accel import apply_speed_options, memory_format
from byol3d.training.engine import create_trainer, resolve_amp
from byol3d.training.handlers import MetricsLogger, Reseed, TargetUpdate
from byol3d.training.optim import build_optimizer, warmup_cosine


@dataclass
class StepSetup:
    """One comparison's shared settings."""

    spatial_dims: int
    encoder: str
    size: int
    batch: int
    in_channels: int
    device: torch.device
    hidden_dim: int = 4096
    projection_dim: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-4
    arch: dict = field(default_factory=dict)  # build_encoder's settings of non-ResNet encoders

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *[self.size] * self.spatial_dims)


def make_batches(setup: StepSetup, n: int, seed: int = 0) -> list[dict]:
    """``n`` batches of two views, on the device (the same tensors for every side)."""
    g = torch.Generator().manual_seed(seed)
    shape = (setup.batch, *setup.input_shape)
    return [
        {k: torch.rand(shape, generator=g).to(setup.device) for k in ("view1", "view2")}
        for _ in range(n)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def byol3d_model(setup: StepSetup, channels_last: bool) -> BYOL:
    torch.manual_seed(0)
    enc = build_encoder(
        setup.encoder, spatial_dims=setup.spatial_dims, in_channels=setup.in_channels, **setup.arch
    )
    model = BYOL(
        enc.to(setup.device),
        input_shape=setup.input_shape,
        hidden_dim=setup.hidden_dim,
        projection_dim=setup.projection_dim,
    )
    apply_speed_options(model, channels_last=channels_last, spatial_dims=setup.spatial_dims)
    return model


def byol3d_engine(setup: StepSetup, amp: str, channels_last: bool, log_every: int = 10):
    """byol3d as ``byol3d pretrain`` runs it: create_trainer + Reseed, TargetUpdate,
    MetricsLogger (metrics.csv every ``log_every`` iterations) and the warm-up/cosine lr
    scheduler, fed the in-memory batches by ``trainer.run``."""
    model = byol3d_model(setup, channels_last)
    opt = build_optimizer(model, "adamw", lr=setup.lr, weight_decay=setup.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps=10, total_steps=1000))
    amp_dtype = resolve_amp(amp, setup.device)
    scaler = torch.amp.GradScaler(setup.device.type) if amp_dtype == torch.float16 else None
    trainer = create_trainer(
        model,
        opt,
        device=setup.device,
        lr_scheduler=sched,
        amp_dtype=amp_dtype,
        scaler=scaler,
        memory_format=memory_format(setup.spatial_dims) if channels_last else None,
    )
    tmp = tempfile.TemporaryDirectory(prefix="byol3d-bench-")
    Reseed(0, []).attach(trainer)
    TargetUpdate(model, base_tau=0.996).attach(trainer)
    MetricsLogger(f"{tmp.name}/metrics.csv", log_every=log_every).attach(trainer)

    def run(batches: list[dict]) -> None:
        trainer.run(batches, max_epochs=1)
        sync(setup.device)

    run.keep = tmp  # the metrics folder lives as long as the runner
    run.model = model
    return run, amp_dtype


def byol3d_bare(setup: StepSetup, amp: str, channels_last: bool):
    """The same BYOL module, optimizer, scheduler and EMA in a plain loop: the bare compute."""
    model = byol3d_model(setup, channels_last)
    opt = build_optimizer(model, "adamw", lr=setup.lr, weight_decay=setup.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps=10, total_steps=1000))
    amp_dtype = resolve_amp(amp, setup.device)
    fmt = memory_format(setup.spatial_dims) if channels_last else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast(setup.device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else contextlib.nullcontext
    )

    def run(batches: list[dict]) -> None:
        model.train()
        for k, batch in enumerate(batches):
            v1 = batch["view1"].to(setup.device, non_blocking=True).contiguous(memory_format=fmt)
            v2 = batch["view2"].to(setup.device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast():
                loss = model(v1, v2)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            model.update_target(cosine_tau(k, 1000, 0.996))
        sync(setup.device)

    return run, amp_dtype


def lightly_loop(setup: StepSetup):
    """lightly's BYOL example (examples/pytorch/byol.py) on byol3d's encoder, as written there:
    per-view online and momentum forwards, ``update_momentum`` with ``cosine_schedule``,
    ``NegativeCosineSimilarity``; fp32 (the example has no autocast)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    class LightlyBYOL(nn.Module):
        def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(
                feature_dim, setup.hidden_dim, setup.projection_dim
            )
            self.prediction_head = BYOLPredictionHead(
                setup.projection_dim, setup.hidden_dim, setup.projection_dim
            )
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            y = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(y)
            return self.prediction_head(z)

        def forward_momentum(self, x):
            y = self.backbone_momentum(x).flatten(start_dim=1)
            z = self.projection_head_momentum(y)
            return z.detach()

    torch.manual_seed(0)
    backbone = build_encoder(
        setup.encoder, spatial_dims=setup.spatial_dims, in_channels=setup.in_channels
    )
    feature_dim = 512 if setup.encoder in ("resnet10", "resnet18", "resnet34") else 2048
    model = LightlyBYOL(backbone, feature_dim).to(setup.device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)
    device, epochs = setup.device, 100
    state = {"epoch": 0}

    def run(batches: list[dict]) -> None:
        total_loss = 0
        momentum_val = cosine_schedule(state["epoch"], epochs, 0.996, 1)
        for batch in batches:
            x0, x1 = batch["view1"], batch["view2"]
            update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum_val)
            x0 = x0.to(device)
            x1 = x1.to(device)
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        avg_loss = total_loss / len(batches)
        float(avg_loss)  # the example prints it at each epoch end
        state["epoch"] += 1

    return run, None


def byol_pytorch_loop(setup: StepSetup):
    """byol-pytorch 0.8.2 as its README uses it: ``loss = learner(images)``, ``opt.zero_grad()``,
    ``loss.backward()``, ``opt.step()``, ``learner.update_moving_average()``. Its built-in
    augmentations are replaced by identity (``augment_fn``), since the views come prepared, as
    they do for the other sides; its two views are then the same batch (same compute). 2D only:
    its constructor runs ``torch.randn(2, 3, image_size, image_size)`` through the network."""
    from byol_pytorch import BYOL as LucidBYOL

    if setup.spatial_dims != 2 or setup.in_channels != 3:
        raise ValueError("byol-pytorch builds itself with a 2D RGB dry run: 2D, 3 channels only")
    torch.manual_seed(0)
    net = build_encoder(setup.encoder, spatial_dims=2, in_channels=3).to(setup.device)
    learner = LucidBYOL(
        net,
        image_size=setup.size,
        hidden_layer="avgpool",
        projection_size=setup.projection_dim,
        projection_hidden_size=setup.hidden_dim,
        augment_fn=nn.Identity(),
        augment_fn2=nn.Identity(),
    ).to(setup.device)
    opt = torch.optim.AdamW(learner.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)

    def run(batches: list[dict]) -> None:
        for batch in batches:
            images = batch["view1"]
            loss = learner(images)
            opt.zero_grad()
            loss.backward()
            opt.step()
            learner.update_moving_average()
        sync(setup.device)

    return run, None
