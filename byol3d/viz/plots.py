"""Training curves and a run summary, from the CSV files a run writes as it goes.

Reads ``RUN_DIR/metrics.csv`` (per iteration: iteration, epoch, loss, tau, lr, collapse) and,
when present, ``RUN_DIR/epochs.csv`` (per epoch: epoch, iteration, train_loss, val_loss,
seconds). Both are appended during training, so everything here works on a run in
progress: a missing ``epochs.csv``, a single row, or a half-written last line (skipped).

- :func:`plot_training` -> ``training.png``: loss (raw, smoothed, validation per epoch),
  tau, learning rate and the collapse statistic against iterations.
- :func:`summarize_run` -> ``summary.json``: iterations, epochs, wall time, samples/s,
  final and best validation loss, final collapse statistic with a warning, artefact paths.
- :func:`format_summary`: the summary as a few terminal lines.

The collapse statistic is the std of the l2-normalised projections times sqrt(dim): about 1
for a healthy representation, towards 0 when every input maps to the same point
(byol-pytorch#44, #85). A final value below :data:`COLLAPSE_THRESHOLD`, or below
:data:`COLLAPSE_DROP` of its first-epoch mean, raises ``collapse_warning``.

>>> from byol3d.viz.plots import format_summary, plot_training, summarize_run
>>> plot_training("runs/demo")                    # doctest: +SKIP
PosixPath('runs/demo/training.png')
>>> print(format_summary(summarize_run("runs/demo")))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from byol3d.errors import DataError
from byol3d.rundir import latest_checkpoint

#: A final collapse statistic below this warns (healthy runs stay near 1).
COLLAPSE_THRESHOLD = 0.2


#: ... as does one below this fraction of the first epoch's mean.
COLLAPSE_DROP = 0.25


_METRICS = ("iteration", "epoch", "loss", "tau", "lr", "collapse")


_EPOCHS = ("epoch", "iteration", "train_loss", "val_loss", "seconds")


def read_csv(path: str | Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The numeric ``columns`` of a CSV as float arrays, robust to a file being written.

    Rows that do not parse or are short (a half-written last line, a repeated header) are
    skipped; an empty field or a column missing from the header gives NaN. A missing or empty file gives empty arrays.
    """
    path = Path(path)
    rows: list[list[float]] = []
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if None in row.values():  # fewer fields than the header: cut off mid-write
                    continue
                try:
                    values = [float(row.get(c) or "nan") for c in columns]
                except ValueError:
                    continue
                if not math.isnan(values[0]):
                    rows.append(values)
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    return {c: table[:, i] for i, c in enumerate(columns)}


def smooth(values: np.ndarray, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing), NaNs skipped.

    ``span`` defaults to about 1/20 of the series (at least 1: no smoothing).

    >>> smooth(np.array([1.0, 1.0, 1.0])).tolist()
    [1.0, 1.0, 1.0]
    """
    values = np.asarray(values, dtype=np.float64)
    span = max(1, len(values) // 20) if span is None else max(1, int(span))
    alpha = 2.0 / (span + 1.0)
    out = np.full_like(values, np.nan)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isnan(v):
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        if weight > 0:
            out[i] = avg / weight
    return out


def _load(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:

    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise DataError(
            f"no metrics.csv in {run_dir}: not a byol3d run directory, or no step logged yet"
        )
    metrics = read_csv(metrics_path, _METRICS)
    if len(metrics["iteration"]) == 0:
        raise DataError(f"{metrics_path} holds no complete row yet: nothing to plot")
    return metrics, read_csv(run_dir / "epochs.csv", _EPOCHS)


def plot_training(run_dir: str | Path, output: str | Path | None = None, dpi: int = 100) -> Path:
    """Draw loss, tau, learning rate and collapse statistic against iterations.

    Args:
        run_dir: a run directory holding ``metrics.csv`` (and maybe ``epochs.csv``).
        output: the PNG path; default ``run_dir/training.png``.
        dpi: resolution of the PNG (the figure is 11 x 7.5 inches).

    Returns:
        The path of the written PNG.

    Raises:
        DataError: if ``metrics.csv`` is missing or has no complete row.
    """

    run_dir = Path(run_dir)
    m, ep = _load(run_dir)
    it = m["iteration"]
    marker = "o" if len(it) < 30 else None  # a few points: show them, a line alone may be invisible

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_tau), (ax_lr, ax_col) = fig.subplots(2, 2, sharex=True)

    ax_loss.plot(
        it,
        m["loss"],
        color="tab:blue",
        alpha=0.3,
        lw=0.8,
        marker=marker,
        ms=3,
        label="train loss (per iteration)",
    )
    if len(it) > 2:
        ax_loss.plot(it, smooth(m["loss"]), color="tab:blue", lw=1.8, label="train loss (smoothed)")
    val_ok = ~np.isnan(ep["val_loss"]) if len(ep["epoch"]) else np.zeros(0, bool)
    if val_ok.any():
        ax_loss.plot(
            ep["iteration"][val_ok],
            ep["val_loss"][val_ok],
            "o-",
            color="tab:orange",
            ms=5,
            label="validation loss (end of epoch)",
        )
    ax_loss.set_ylabel("BYOL loss  (2 - 2 cos, symmetric; 0..8)")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8, loc="upper right")

    ax_tau.plot(it, m["tau"], color="tab:green", marker=marker, ms=3)
    ax_tau.set_ylabel("tau (target EMA momentum)")
    ax_tau.set_title("target momentum tau (cosine schedule to 1)")

    ax_lr.plot(it, m["lr"], color="tab:purple", marker=marker, ms=3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate (warm-up, cosine decay)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    ax_col.axhspan(
        0,
        COLLAPSE_THRESHOLD,
        color="tab:red",
        alpha=0.15,
        label=f"collapse warning (< {COLLAPSE_THRESHOLD})",
    )
    ax_col.axhline(1.0, color="grey", ls="--", lw=1, label="healthy (~1)")
    ax_col.plot(it, m["collapse"], color="tab:red", alpha=0.35, lw=0.8, marker=marker, ms=3)
    if len(it) > 2:
        ax_col.plot(it, smooth(m["collapse"]), color="tab:red", lw=1.8, label="smoothed")
    finite = m["collapse"][np.isfinite(m["collapse"])]
    ax_col.set_ylim(0, max(1.2, float(finite.max()) * 1.05) if len(finite) else 1.2)
    ax_col.set_ylabel("std of l2-normalised projections x sqrt(dim)")
    ax_col.set_title("collapse statistic")
    ax_col.legend(fontsize=8, loc="center right")

    for ax in (ax_lr, ax_col):
        ax.set_xlabel("iteration (optimizer steps)")
    for ax in (ax_loss, ax_tau, ax_lr, ax_col):
        ax.grid(alpha=0.3)
        for x in ep["iteration"][:-1] if len(ep["iteration"]) <= 50 else []:
            ax.axvline(x, color="grey", lw=0.5, alpha=0.4)  # epoch boundaries
    epochs = int(np.nanmax(m["epoch"])) if np.isfinite(m["epoch"]).any() else 0
    fig.suptitle(
        f"BYOL training: {run_dir.resolve()}\n"
        f"{len(it)} iterations logged, last iteration {int(it[-1])}, epoch {epochs}",
        fontsize=11,
    )
    out = Path(output) if output is not None else run_dir / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _batch_size(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        value = cfg.get("train", {}).get("batch_size")
    except (yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def summarize_run(
    run_dir: str | Path, wall_seconds: float | None = None, write: bool = True
) -> dict[str, Any]:
    """Summarise a run directory and (with ``write``) save it as ``run_dir/summary.json``.

    Args:
        run_dir: a run directory holding ``metrics.csv``.
        wall_seconds: the run's wall time; default the sum of ``epochs.csv`` seconds
            (completed epochs only; None when there is none yet).
        write: write ``summary.json`` (NaN values are written as null).

    Returns:
        A dict: ``run_dir``, ``iterations`` (last logged), ``epochs`` (completed epochs from
        epochs.csv, else the epoch of the last logged iteration), ``wall_seconds``,
        ``batch_size`` (train.batch_size in config.yaml, per process), ``samples_per_second``
        (batch_size x iterations / wall_seconds), ``final_train_loss``, ``final_val_loss``,
        ``best_val_loss``, ``best_val_epoch``, ``final_collapse`` (mean over the last 10% of
        iterations), ``first_epoch_collapse``, ``collapse_warning`` (bool),
        ``collapse_message`` (str or None), ``encoder_path``, ``checkpoint_path`` (None when
        absent) and ``summary_path``.

    Raises:
        DataError: if ``metrics.csv`` is missing or has no complete row.
    """

    run_dir = Path(run_dir)
    m, ep = _load(run_dir)
    n = len(m["iteration"])
    iterations = int(np.nanmax(m["iteration"]))
    if len(ep["epoch"]):
        epochs = int(np.nanmax(ep["epoch"]))
        if wall_seconds is None and np.isfinite(ep["seconds"]).any():
            wall_seconds = float(np.nansum(ep["seconds"]))
    else:
        epochs = int(m["epoch"][-1]) if math.isfinite(m["epoch"][-1]) else 0
    batch = _batch_size(run_dir)
    sps = None
    if batch and wall_seconds and wall_seconds > 0:
        sps = batch * iterations / wall_seconds

    val = ep["val_loss"]
    ok = np.isfinite(val)
    final_val = _finite(val[ok][-1]) if ok.any() else None
    best_val = _finite(val[ok].min()) if ok.any() else None
    best_epoch = int(ep["epoch"][ok][np.argmin(val[ok])]) if ok.any() else None
    train = ep["train_loss"][np.isfinite(ep["train_loss"])]
    if len(train):
        final_train = float(train[-1])
    else:  # no epoch finished yet: the mean of the last 10% of iterations
        tail = m["loss"][-max(1, n // 10) :]
        final_train = _finite(np.nanmean(tail)) if np.isfinite(tail).any() else None

    col = m["collapse"]
    tail = col[-max(1, n // 10) :]
    final_col = _finite(np.nanmean(tail)) if np.isfinite(tail).any() else None
    first = col[(m["epoch"] == np.nanmin(m["epoch"])) & np.isfinite(col)]
    first_col = _finite(first.mean()) if len(first) else None
    message = None
    if final_col is not None and final_col < COLLAPSE_THRESHOLD:
        message = (
            f"collapse statistic fell to {final_col:.3f} (< {COLLAPSE_THRESHOLD}; healthy ~1): "
            "the projections are collapsing to a point. Try a lower lr (AdamW ~3e-4), "
            "a higher base_tau, or check the views differ (byol3d preview)"
        )
    elif final_col is not None and first_col and final_col < COLLAPSE_DROP * first_col:
        message = (
            f"collapse statistic dropped to {final_col:.3f}, below {COLLAPSE_DROP:.0%} of its "
            f"first-epoch mean {first_col:.3f}: the representation may be collapsing"
        )
    encoder = run_dir / "encoder.pt"
    ckpt = latest_checkpoint(run_dir)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "iterations": iterations,
        "epochs": epochs,
        "wall_seconds": _finite(wall_seconds) if wall_seconds is not None else None,
        "batch_size": batch,
        "samples_per_second": sps,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "best_val_loss": best_val,
        "best_val_epoch": best_epoch,
        "final_collapse": final_col,
        "first_epoch_collapse": first_col,
        "collapse_warning": message is not None,
        "collapse_message": message,
        "encoder_path": str(encoder) if encoder.is_file() else None,
        "checkpoint_path": str(ckpt) if ckpt is not None else None,
        "summary_path": str(run_dir / "summary.json"),
    }
    if write:
        path = run_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file
    return summary


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_summary(summary: dict[str, Any]) -> str:
    """A few terminal lines of a :func:`summarize_run` dict (the warning, if any, last)."""
    s = summary
    wall = s.get("wall_seconds")
    wall_text = "n/a" if wall is None else f"{wall:.1f} s ({wall / 60:.1f} min)"
    sps = s.get("samples_per_second")
    speed = "" if sps is None else f", {sps:.2f} samples/s (per process)"
    best = s.get("best_val_loss")
    best_text = "" if best is None else f" (best {best:.4f} at epoch {s.get('best_val_epoch')})"
    val = s.get("final_val_loss")
    val_text = "" if val is None else f", validation {_num(val)}{best_text}"  # none held out
    run_dir = Path(s["run_dir"])
    lines = [
        f"byol3d: run {s['run_dir']}: {s['epochs']} epochs, {s['iterations']} iterations, "
        f"{wall_text}{speed}",
        f"  loss:        train {_num(s.get('final_train_loss'))}{val_text}",
        f"  collapse:    {_num(s.get('final_collapse'), '.3f')} (healthy ~1; first epoch "
        f"{_num(s.get('first_epoch_collapse'), '.3f')})",
        f"  encoder:     {s.get('encoder_path') or 'not written yet'}",
        f"  checkpoint:  {s.get('checkpoint_path') or 'none yet'}",
        f"  metrics:     {run_dir / 'metrics.csv'}, {run_dir / 'epochs.csv'}",
        f"  summary:     {s.get('summary_path')}",
    ]
    if s.get("collapse_warning"):
        lines.append(f"  WARNING: {s.get('collapse_message')}")
    return "\n".join(lines)
