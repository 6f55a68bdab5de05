"""PyTorch-Ignite engines for BYOL training (their handlers: :mod:`byol3d.training.handlers`).

* :func:`create_trainer`: the training Engine. Its ``train_step`` runs both views through
  the model under autocast, back-propagates, steps the optimizer every
  ``accumulate_steps`` iterations (and at each epoch end) and records on ``engine.state.optimizer_stepped``
  whether the optimizer really stepped (an fp16 step skipped for inf gradients does not), which
  :class:`~byol3d.training.handlers.TargetUpdate` reads to update the target only then.
* :func:`create_evaluator`: the validation loss, in eval mode, without gradients.
* :func:`view_geometry`, :func:`resolve_device`, :func:`resolve_amp`, :func:`optimizer_steps`,
  :func:`unwrap`: the small pieces both need.

>>> from byol3d.training.engine import create_trainer
>>> from byol3d.training.handlers import TargetUpdate
>>> # trainer = create_trainer(model, optimizer, device="cpu")
>>> # TargetUpdate(model, base_tau=0.996).attach(trainer)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Average
from torch import nn

from byol3d.checks import check_number
from byol3d.errors import Byol3dError


def view_geometry(batch: Mapping[str, Any], view_key: str) -> dict[str, torch.Tensor]:
    """The recorded geometry of one view in a collated batch: ``box``, ``flip`` and ``rot90``.

    Reads ``{view_key}_box`` (required), ``{view_key}_flip`` (required: a pipeline that may flip
    must record it with :class:`RecordedRandFlipd`, and one that never flips stores zeros) and
    ``{view_key}_rot90`` (optional: absent means no rotation).

    Raises:
        KeyError: naming the missing key and the batch's keys.
    """
    geometry = {}
    for name, required in (("box", True), ("flip", True), ("rot90", False)):
        key = f"{view_key}_{name}"
        if key in batch:
            geometry[name] = torch.as_tensor(batch[key])
        elif required:
            raise KeyError(
                f"dense BYOL needs {key!r} in every batch (recorded by RandResizedCropd / "
                f"RecordedRandFlipd); the batch holds {sorted(batch)}"
            )
    return geometry


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DistributedDataParallel (or the module itself)."""
    return (
        model.module
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        else model
    )


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Byol3dError(
            f"train.device is {device!r} but no CUDA device is available (use auto or cpu)"
        )
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full precision).

    ``auto`` gives bf16 on GPUs that support it, fp16 on older GPUs, and full precision on CPU
    (CPU autocast only pays on CPUs with native bf16; ask for it with ``bf16``).
    """
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise Byol3dError("train.amp fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            # native bf16 from Ampere (compute capability 8) on; older cards only emulate it
            return (
                torch.bfloat16
                if torch.cuda.get_device_capability(device)[0] >= 8
                else torch.float16
            )
        return None
    raise Byol3dError(f"invalid train.amp {amp!r}, must be one of auto, bf16, fp16, none")


def _to(
    batch: dict, key: str, device: torch.device, memory_format: torch.memory_format | None = None
) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no {key!r}; it holds {sorted(batch)}")
    x = torch.as_tensor(batch[key]).to(device, non_blocking=True)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def _geometry_kwargs(model: nn.Module, batch: dict, keys: Sequence[str]) -> dict:
    """``geometry1``/``geometry2`` for a model whose dense term needs the views' geometry, else {}."""
    if not getattr(unwrap(model), "wants_geometry", False):
        return {}
    return {f"geometry{i}": view_geometry(batch, key) for i, key in enumerate(keys, start=1)}


def create_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulate_steps: int = 1,
    grad_clip: float | None = None,
    view_keys: Sequence[str] = ("view1", "view2"),
    memory_format: torch.memory_format | None = None,
) -> Engine:
    """The training Engine: one iteration = one batch of two views.

    Args:
        model: a :class:`byol3d.BYOL` (possibly wrapped in DDP) returning ``(loss, stats)`` when
            called with ``return_stats=True``.
        optimizer: over the model's online parameters.
        device: where batches go (copied with ``non_blocking=True``).
        lr_scheduler: stepped once per optimizer step.
        amp_dtype: autocast dtype (``None``: full precision).
        scaler: a GradScaler for fp16 (``None`` otherwise).
        accumulate_steps: iterations per optimizer step; the loss is divided accordingly.
        grad_clip: max gradient norm, or ``None``.
        view_keys: the batch keys of the two views. When the model's dense term is on
            (``model.wants_geometry``), the views' recorded ``{key}_box``, ``{key}_flip`` and
            ``{key}_rot90`` are passed to it as ``geometry1``/``geometry2`` keyword arguments.
        memory_format: e.g. ``torch.channels_last_3d`` to match a channels-last model
            (``train.channels_last``); ``None`` leaves the batches as they come.

    The step output is ``{"loss": tensor, "collapse": tensor, "lr": float}`` (tensors 0-dim, detached, on device:
    nothing here forces a host sync), plus ``"dense"`` (the unweighted dense term) when it is on.
    """
    check_number("accumulate_steps", accumulate_steps, 1, integer=True)
    device = torch.device(device)
    key1, key2 = view_keys
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else contextlib.nullcontext
    )

    def train_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        model.train()
        v1, v2 = _to(batch, key1, device, memory_format), _to(batch, key2, device, memory_format)
        epoch_length = engine.state.epoch_length or engine.state.iteration
        i = (engine.state.iteration - 1) % epoch_length + 1  # 1-based iteration within the epoch
        will_step = i % accumulate_steps == 0 or i == epoch_length
        group_start = (i - 1) // accumulate_steps * accumulate_steps
        group = min(accumulate_steps, epoch_length - group_start)  # the last group may be short
        sync = (
            model.no_sync
            if (not will_step and hasattr(model, "no_sync"))
            else contextlib.nullcontext
        )
        with sync():
            with autocast():
                loss, stats = model(
                    v1, v2, return_stats=True, **_geometry_kwargs(model, batch, view_keys)
                )
            if loss.ndim:  # DataParallel gathers one loss per replica
                loss, stats = loss.mean(), {k: v.mean() for k, v in stats.items()}
            scaled = loss / group
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        stepped = False
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves it after)
        if will_step:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if grad_clip is not None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
            if scaler is not None:
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                stepped = scaler.get_scale() >= scale_before  # the scale drops on a skipped step
            else:
                optimizer.step()
                stepped = True
            optimizer.zero_grad(set_to_none=True)
            if lr_scheduler is not None:
                lr_scheduler.step()
        engine.state.optimizer_stepped = stepped
        output = {"loss": loss.detach(), "collapse": stats["collapse"], "lr": lr}
        if "dense" in stats:
            output["dense"] = stats["dense"]
        return output

    trainer = Engine(train_step)
    trainer.state.optimizer_stepped = False
    trainer.state.tau = float("nan")
    trainer.state.accumulate_steps = accumulate_steps
    return trainer


def optimizer_steps(iteration: int, epoch_length: int, accumulate_steps: int = 1) -> int:
    """Optimizer steps taken after ``iteration`` iterations.

    The trainer steps every ``accumulate_steps`` iterations and at the end of each epoch (so no
    gradient is carried over an epoch boundary or lost at a checkpoint): an epoch of L
    iterations has ``ceil(L / accumulate_steps)`` steps.

    >>> optimizer_steps(10, 10, 4), optimizer_steps(13, 10, 4)
    (3, 3)
    """
    per_epoch = math.ceil(epoch_length / accumulate_steps)
    full, rem = divmod(int(iteration), int(epoch_length))
    return full * per_epoch + rem // accumulate_steps


def create_evaluator(
    model: nn.Module,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    view_keys: Sequence[str] = ("view1", "view2"),
    memory_format: torch.memory_format | None = None,
) -> Engine:
    """An Engine computing the mean BYOL loss over a loader, in eval mode and without gradients.

    ``evaluator.run(loader).metrics["loss"]`` is the mean over batches. ``amp_dtype`` and
    ``memory_format`` as the trainer's (``train.amp``, ``train.channels_last``).
    """
    device = torch.device(device)
    key1, key2 = view_keys

    @torch.no_grad()
    def eval_step(engine: Engine, batch: dict) -> torch.Tensor:
        model.eval()
        v1, v2 = _to(batch, key1, device, memory_format), _to(batch, key2, device, memory_format)
        with (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype
            else contextlib.nullcontext()
        ):
            return model(v1, v2, **_geometry_kwargs(model, batch, view_keys)).float()

    evaluator = Engine(eval_step)
    Average().attach(evaluator, "loss")
    return evaluator
