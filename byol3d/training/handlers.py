"""The trainer's handlers, each a class with ``attach(engine)`` (MONAI's handler idiom).

* :class:`TargetUpdate`: the EMA target update with the cosine tau, once per real optimizer
  step (skipping non-steps, unlike solo-learn#286), tau on ``engine.state.tau``.
* :class:`MetricsLogger`: one metrics.csv row per iteration (loss, tau, lr, collapse), written
  in blocks of ``log_every`` iterations so the step itself never waits on the GPU; a
  non-finite loss stops the run with the iteration that produced it.
* :class:`Reseed`: per-epoch seeds re-derived from (seed, epoch, rank), so a resumed run
  draws the same data order and augmentations as an uninterrupted one.
* :func:`attach_epoch_log`: epochs.csv (train and validation loss, kNN accuracy, seconds).
* :class:`KnnMonitor`: with ``train.knn_csv`` (a labels CSV read by
  :func:`byol3d.data.discovery.read_image_list`), every ``train.knn_every`` epochs the online
  encoder (eval mode, no gradients) embeds the labelled volumes with the run's deterministic
  preprocessing and sliding windows (no overlap, to stay cheap), and the leave-one-out accuracy
  of a ``k``-nearest-neighbour vote (cosine similarity, ``k = 5`` or fewer for tiny sets) is
  logged as ``knn_acc`` in ``epochs.csv`` and ``epoch/knn_acc`` in TensorBoard. A falling or
  chance-level ``knn_acc`` while the loss falls is a sign that BYOL learns something other
  than what the labels need.
* :func:`tensorboard_writer`, :class:`BatchPreview`, :func:`plot_and_summarize`:
  TensorBoard scalars and previews of the views in hand, and the plots and summary written
  at the end.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.utils import manual_seed
from torch import nn

from byol3d.checks import check_number
from byol3d.data.discovery import read_image_list
from byol3d.errors import NonFiniteLossError
from byol3d.evaluation.features import extract_features
from byol3d.evaluation.probe import loo_knn_accuracy
from byol3d.models.byol import cosine_tau
from byol3d.training.distributed import is_main, world_size
from byol3d.training.engine import (
    create_evaluator,
    optimizer_steps,
    unwrap,
)
from byol3d.viz.plots import format_summary, plot_training, summarize_run
from byol3d.viz.preview import draw_views

logger = logging.getLogger("byol3d")


def tensorboard_writer(enabled: bool, log_dir: Path):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.csv only
        return None
    return SummaryWriter(log_dir=str(log_dir))


class BatchPreview:
    """Every ``every`` iterations: the views of the batch in hand as a TensorBoard image.

    Two samples' ``view1``/``view2`` are copied to the CPU (nothing is read from disk) and the
    figure is drawn and written in a background thread, so the training thread only pays the
    copy. Attach it on the rank that holds the writer (rank 0); the other ranks never wait for
    it. A picture never fails the run.

    Args:
        writer: a ``SummaryWriter``.
        every: iterations between previews (>= 1).
        n: samples drawn.
        view_keys: the batch keys of the two views.
    """

    def __init__(
        self, writer, every: int, n: int = 2, view_keys: Sequence[str] = ("view1", "view2")
    ):
        check_number("every", every, 1, integer=True)
        self.writer, self.every, self.n, self.view_keys = writer, every, n, tuple(view_keys)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="byol3d-preview")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        try:
            count = min(self.n, len(batch[self.view_keys[0]]))
            samples = [{k: batch[k][i].detach().float().cpu() for k in self.view_keys} for i in range(count)]  # fmt: skip
        except Exception as err:  # noqa: BLE001
            logger.warning("no view preview for TensorBoard: %s", err)
            return
        self.pool.submit(self._draw, samples, engine.state.iteration)

    def _draw(self, samples, iteration: int) -> None:
        try:
            fig = draw_views(samples, f"BYOL views of the training batch at iteration {iteration}")
            self.writer.add_figure("views", fig, iteration)
        except Exception as err:  # noqa: BLE001
            logger.warning("no view preview for TensorBoard: %s", err)

    def close(self, _engine: Engine | None = None) -> None:
        """Wait for the last preview (before the writer is closed)."""
        self.pool.shutdown(wait=True)


def plot_and_summarize(out: Path) -> str | None:
    """training.png and summary.json at the end of a run; returns the summary's terminal text
    (None when it cannot be made). A picture never fails the run."""

    try:
        png = plot_training(out)
        return f"{format_summary(summarize_run(out))}\n  plot:        {png}"
    except Exception as err:  # noqa: BLE001 - e.g. a finished run that logged nothing new
        logger.warning("no training plot: %s", err)
        return None


def attach_epoch_log(
    trainer: Engine,
    model,
    path: Path,
    val_loader,
    val_views,
    device,
    amp_dtype,
    seed: int,
    writer,
    knn: bool = False,
    memory_format: torch.memory_format | None = None,
) -> None:
    """Per epoch: mean training loss, validation loss (fixed augmentations), wall time -> epochs.csv.

    Without a validation set (``data.val_fraction: 0``) the epoch line and TensorBoard carry no
    validation loss, and its ``epochs.csv`` column is NaN."""
    evaluator = (
        create_evaluator(model, device=device, amp_dtype=amp_dtype, memory_format=memory_format)
        if val_loader is not None
        else None
    )
    state = {"losses": [], "start": time.perf_counter()}
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda _e: state.update(losses=[], start=time.perf_counter())
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: state["losses"].append(e.state.output["loss"])
    )

    def log_epoch(engine: Engine) -> None:
        train_loss = (
            torch.stack(state["losses"]).float().mean()
            if state["losses"]
            else torch.tensor(float("nan"))
        )
        if world_size() > 1:
            train_loss = idist.all_reduce(train_loss) / world_size()
        train_loss = train_loss.item()
        val_loss = float("nan")
        if evaluator is not None:
            # the same augmentations every epoch, so validation losses are comparable
            torch_state = torch.random.get_rng_state()
            val_views.set_random_state(seed=seed)
            torch.manual_seed(seed)
            val_loss = evaluator.run(val_loader).metrics["loss"]
            torch.random.set_rng_state(torch_state)
        seconds = time.perf_counter() - state["start"]
        if is_main():
            new = not path.exists()
            with path.open("a") as f:
                if new:
                    f.write(
                        "epoch,iteration,train_loss,val_loss,seconds"
                        + (",knn_acc\n" if knn else "\n")
                    )
                knn_acc = f",{engine.state.metrics.pop('knn_acc', float('nan')):.4f}" if knn else ""
                f.write(
                    f"{engine.state.epoch},{engine.state.iteration},{train_loss:.6f},{val_loss:.6f},{seconds:.2f}{knn_acc}\n"
                )
        engine.state.metrics.update({"train_loss": train_loss, "val_loss": val_loss})
        if writer is not None:
            writer.add_scalar("epoch/train_loss", train_loss, engine.state.iteration)
            if evaluator is not None:
                writer.add_scalar("epoch/val_loss", val_loss, engine.state.iteration)
        val_text = f", val loss {val_loss:.4f}" if evaluator is not None else ""
        logger.info(
            "epoch %d: train loss %.4f%s, %.1f s", engine.state.epoch, train_loss, val_text, seconds
        )

    trainer.add_event_handler(Events.EPOCH_COMPLETED, log_epoch)


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
        check_number("base_tau", base_tau, 0.0, 1.0)
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
        check_number("log_every", log_every, 1, integer=True)
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


class KnnMonitor:
    """Logs the leave-one-out kNN accuracy of ``encoder`` on a labelled CSV every few epochs.

    Args:
        encoder: the online encoder (a MONAI ResNet; its ``layer4`` map is pooled).
        csv_path: labels CSV (see :func:`byol3d.data.discovery.read_image_list`).
        preprocess: what the encoder sees without augmentation (``build_eval_transform(cfg)``).
        roi_size: sliding-window size (the crop size).
        every: epochs between evaluations (>= 1).
        k: neighbours.
        device: where the encoder lives.
        writer: an optional TensorBoard ``SummaryWriter``.
        amp_dtype, memory_format: the training step's autocast dtype and memory format.

    Under DDP every rank attaches it and embeds its share of the volumes (rows ``rank``,
    ``rank + world``, ...; each rank preprocesses and keeps only its share), the embeddings
    are gathered, and every rank computes the same accuracy: the monitor takes 1/world of
    the time and no rank waits at the next collective for one rank's whole pass.
    """

    def __init__(
        self,
        encoder: nn.Module,
        csv_path: str,
        preprocess: Callable,
        roi_size: Sequence[int],
        every: int = 1,
        k: int = 5,
        device: torch.device | str = "cpu",
        writer=None,
        channels: Sequence[str] | None = None,
        amp_dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        check_number("every", every, 1, integer=True)
        self.amp_dtype, self.memory_format = amp_dtype, memory_format
        self.rows = read_image_list(csv_path, require_label=True, channels=channels)
        self.encoder, self.preprocess, self.roi_size = encoder, preprocess, tuple(roi_size)
        self.every, self.k, self.device, self.writer = every, k, torch.device(device), writer
        self._images: list[torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    def accuracy(self) -> float:
        """Embed the labelled volumes with the current weights and return the LOO kNN accuracy."""

        rank, world = idist.get_rank(), world_size()
        mine = self.rows[rank::world] or self.rows[:1]  # a spare row keeps shapes equal
        if self._images is None:
            self._images = [self.preprocess({"image": r["image"]})["image"] for r in mine]
        feats = torch.from_numpy(
            extract_features(
                self.encoder,
                self._images,
                roi_size=self.roi_size,
                overlap=0.0,
                device=self.device,
                amp_dtype=self.amp_dtype,
                memory_format=self.memory_format,
            )  # fmt: skip
        )
        if world > 1:
            per = -(-len(self.rows) // world)
            padded = torch.zeros(per, feats.shape[1])
            padded[: len(feats)] = feats[:per]
            gathered = idist.all_gather(padded.to(self.device)).cpu()
            feats = unshard(gathered, len(self.rows), world)
        return loo_knn_accuracy(feats, [r["label"] for r in self.rows], self.k)

    def __call__(self, engine: Engine) -> None:
        acc = self.accuracy()
        engine.state.metrics["knn_acc"] = acc
        if self.writer is not None:
            self.writer.add_scalar("epoch/knn_acc", acc, engine.state.iteration)
        logger.info("epoch %d: kNN accuracy %.3f on %d labelled volumes", engine.state.epoch, acc, len(self.rows))  # fmt: skip


def unshard(gathered: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Rows ``0..n-1`` in order from ``world`` equal blocks, block r holding rows r, r + world, ...

    >>> unshard(torch.tensor([[0.], [2.], [1.], [9.]]), n=3, world=2).flatten().tolist()
    [0.0, 1.0, 2.0]
    """
    per = gathered.shape[0] // world
    order = [r * per + j for i in range(n) for r, j in [(i % world, i // world)]]
    return gathered[order]
