"""PyTorch-Ignite engines and handlers for BYOL training.

* :func:`create_trainer`: the training Engine. Its ``train_step`` runs both views through
  the model under autocast, back-propagates, steps the optimizer every
  ``accumulate_steps`` iterations (and at each epoch end) and records on ``engine.state.optimizer_stepped``
  whether the optimizer really stepped (an fp16 step skipped for inf gradients does not).
* :class:`TargetUpdate`: the EMA target update with the cosine tau, once per real
  optimizer step (skipping non-steps, unlike solo-learn#286), tau on ``engine.state.tau``.
* :class:`MetricsLogger`: one metrics.csv row per iteration (loss, tau, lr, collapse),
  written in blocks of ``log_every`` iterations so the step itself never waits on the GPU;
  a non-finite loss stops the run with the iteration that produced it.
* :func:`create_evaluator`: the validation loss, in eval mode, without gradients.
* :class:`Reseed`: per-epoch seeds re-derived from (seed, epoch), so a resumed run draws the
  same data order and augmentations as an uninterrupted one.

>>> from byol3d.engine import create_trainer, TargetUpdate
>>> # trainer = create_trainer(model, optimizer, device="cpu")
>>> # TargetUpdate(model, base_tau=0.996).attach(trainer)
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average
from ignite.utils import manual_seed
from torch import nn

from byol3d.byol import cosine_tau
from byol3d.errors import Byol3dError
from byol3d.geometry import view_geometry

__all__ = [
    "MetricsLogger",
    "NonFiniteLossError",
    "Reseed",
    "TargetUpdate",
    "create_evaluator",
    "create_trainer",
    "resolve_amp",
    "resolve_device",
    "unwrap",
]


class NonFiniteLossError(Byol3dError):
    """The loss became NaN or Inf; the last checkpoint written before it is intact."""


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
    if accumulate_steps < 1:
        raise ValueError(f"invalid accumulate_steps {accumulate_steps!r}, must be >= 1")
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


class TargetUpdate:
    """EMA update of BYOL's target network, with BYOL's cosine tau, once per optimizer step.

    At optimizer step k (0-based) of K = max_epochs * ceil(epoch_length / accumulate_steps) the target
    is updated with ``tau = cosine_tau(k, K, base_tau)``: ``base_tau`` at the first step, rising to
    1.0 at the last. Iterations on which the optimizer did not step (gradient accumulation, an
    fp16 step skipped for overflow) leave the target alone. K is read from the engine's state
    at every call, so raising ``max_epochs`` on resume stretches the schedule.

    Args:
        model: the BYOL module (or DDP around it); its ``update_target(tau)`` is called.
        base_tau: tau at the first step, in [0, 1] (paper: 0.996; 0.99 for short runs).

    Note ignite's ``EMAHandler`` takes momentum = 1 - tau (0.004, not 0.996) and warms up only
    linearly, hence this handler.
    """

    def __init__(self, model: nn.Module, base_tau: float = 0.996) -> None:
        if not 0.0 <= base_tau <= 1.0:
            raise ValueError(f"invalid base_tau {base_tau!r}, must be in [0, 1]")
        self.model = model
        self.base_tau = float(base_tau)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not getattr(engine.state, "optimizer_stepped", True):
            return
        accumulate = getattr(engine.state, "accumulate_steps", 1)
        per_epoch = optimizer_steps(
            engine.state.epoch_length, engine.state.epoch_length, accumulate
        )
        total = max(1, engine.state.max_epochs * per_epoch)
        step = optimizer_steps(engine.state.iteration, engine.state.epoch_length, accumulate) - 1
        engine.state.tau = cosine_tau(step, total, self.base_tau)
        unwrap(self.model).update_target(engine.state.tau)


class MetricsLogger:
    """Per-iteration metrics to ``metrics.csv`` (and TensorBoard), flushed every ``log_every``.

    Columns: iteration, epoch, loss, tau, lr, collapse. Tensors are gathered on the device and
    moved to the host in one transfer per flush, so the training step itself never waits. On
    each flush the losses are checked: a NaN or Inf raises :class:`NonFiniteLossError` naming the
    first bad iteration, before any later checkpoint can be written. The latest flushed values
    are put on ``engine.state.metrics`` (``loss``, ``collapse``, ``tau``, ``lr``) for progress bars.

    Args:
        path: the CSV file; appended to when it exists (a resumed run), else created with a header.
        log_every: iterations between flushes (and host syncs).
        writer: an optional ``torch.utils.tensorboard.SummaryWriter``.
        extra_columns: further tensors of the step output logged after ``collapse``, e.g.
            ``("dense",)`` for the dense BYOL term.
    """

    COLUMNS = ("iteration", "epoch", "loss", "tau", "lr", "collapse")

    def __init__(
        self,
        path: str | Path,
        log_every: int = 10,
        writer=None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        if log_every < 1:
            raise ValueError(f"invalid log_every {log_every!r}, must be >= 1")
        self.extra_columns = tuple(extra_columns)
        self.path = Path(path)
        self.log_every = log_every
        self.writer = writer
        self._rows: list[tuple] = []
        self._values: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self.flush)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        engine.add_event_handler(Events.COMPLETED, self.flush)

    def record(self, engine: Engine) -> None:
        out = engine.state.output
        self._rows.append((engine.state.iteration, engine.state.epoch, engine.state.tau, out["lr"]))
        names = ("loss", "collapse", *self.extra_columns)
        self._values.append(torch.stack([out[name].float() for name in names]))

    def flush(self, engine: Engine) -> None:
        if not self._rows:
            return
        values = torch.stack(self._values)
        if idist.get_world_size() > 1:  # every rank logs (and judges NaN on) the same mean values
            values = idist.all_reduce(values) / idist.get_world_size()
        values = values.cpu().tolist()
        rows = [
            (it, ep, loss, tau, lr, col, *extra)
            for (it, ep, tau, lr), (loss, col, *extra) in zip(self._rows, values)
        ]
        self._rows, self._values = [], []
        if idist.get_rank() == 0:
            new = not self.path.exists() or self.path.stat().st_size == 0
            with self.path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(self.COLUMNS + self.extra_columns)
                writer.writerows(rows)
        if self.writer is not None:
            for it, _ep, loss, tau, lr, col, *extra in rows:
                for name, value in (("loss", loss), ("tau", tau), ("lr", lr), ("collapse", col)):
                    self.writer.add_scalar(f"train/{name}", value, it)
                for name, value in zip(self.extra_columns, extra):
                    self.writer.add_scalar(f"train/{name}", value, it)
        bad = next((r for r in rows if not math.isfinite(r[2])), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"loss became {bad[2]} at iteration {bad[0]} (epoch {bad[1]}); stopped. The checkpoints "
                "written before it are intact; try a lower train.lr, train.amp=none or train.grad_clip"
            )
        it, ep, loss, tau, lr, col, *extra = rows[-1]
        engine.state.metrics.update({"loss": loss, "collapse": col, "tau": tau, "lr": lr})
        engine.state.metrics.update(zip(self.extra_columns, extra))


def create_evaluator(
    model: nn.Module,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    view_keys: Sequence[str] = ("view1", "view2"),
) -> Engine:
    """An Engine computing the mean BYOL loss over a loader, in eval mode and without gradients.

    ``evaluator.run(loader).metrics["loss"]`` is the mean over batches.
    """
    device = torch.device(device)
    key1, key2 = view_keys

    @torch.no_grad()
    def eval_step(engine: Engine, batch: dict) -> torch.Tensor:
        model.eval()
        v1, v2 = _to(batch, key1, device), _to(batch, key2, device)
        with (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype
            else contextlib.nullcontext()
        ):
            return model(v1, v2, **_geometry_kwargs(model, batch, view_keys)).float()

    evaluator = Engine(eval_step)
    Average().attach(evaluator, "loss")
    return evaluator


class Reseed:
    """At each epoch start, seed python, numpy, torch and the given transforms from (seed, epoch, rank).

    DataLoader workers derive their seeds from torch's generator, and in-process MONAI
    transforms are re-seeded through ``set_random_state``, so epoch e draws the same order and
    augmentations whether the run got there uninterrupted or resumed from a checkpoint.

    Args:
        seed: the run's seed.
        transforms: objects with ``set_random_state(seed=...)`` (e.g. a MONAI Compose).
    """

    def __init__(self, seed: int, transforms: Sequence = ()) -> None:
        self.seed = int(seed)
        self.transforms = list(transforms)

    def epoch_seed(self, epoch: int) -> int:
        # the rank enters the seed: under DDP each process augments its own samples differently
        entropy = [self.seed, int(epoch), idist.get_rank()]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = self.epoch_seed(engine.state.epoch)
        manual_seed(seed)
        for t in self.transforms:
            t.set_random_state(seed=seed)


def every_epochs(every: int) -> Callable[[Engine, int], bool]:
    """An event filter: every ``every`` epochs and at the last epoch."""

    def _filter(engine: Engine, epoch: int) -> bool:
        return epoch % every == 0 or epoch == engine.state.max_epochs

    return _filter
