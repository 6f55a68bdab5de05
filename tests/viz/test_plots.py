"""Tests of byol3d.plots: training.png, summary.json and its terminal lines, on synthetic CSVs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from byol3d.errors import DataError
from byol3d.viz.plots import format_summary, plot_training, read_csv, smooth, summarize_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(
    run: Path,
    collapse,
    epochs: int = 4,
    per_epoch: int = 10,
    val=(5.0, 3.0, 3.5, 3.2),
    seconds=(10.0, 10.0, 10.0, 10.0),
    batch_size: int | None = 4,
) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    n = epochs * per_epoch
    lines = ["iteration,epoch,loss,tau,lr,collapse"]
    for k in range(1, n + 1):
        tau = 1 - 0.004 * (math.cos(math.pi * k / n) + 1) / 2
        lr = 3e-4 * min(1.0, k / per_epoch)
        lines.append(
            f"{k},{(k - 1) // per_epoch + 1},{4 - 3 * k / n:.4f},{tau:.6f},{lr:.3e},{collapse(k):.4f}"
        )
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    if epochs:
        rows = ["epoch,iteration,train_loss,val_loss,seconds"]
        rows += [
            f"{e},{e * per_epoch},{4 - e * 0.5},{val[e - 1]},{seconds[e - 1]}"
            for e in range(1, epochs + 1)
        ]
        (run / "epochs.csv").write_text("\n".join(rows) + "\n")
    if batch_size is not None:
        (run / "config.yaml").write_text(f"seed: 0\ntrain:\n  batch_size: {batch_size}\n")
    return run


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


def test_plot_training_writes_a_png_with_four_labelled_panels(tmp_path):
    run = _write_run(tmp_path / "run", collapse=lambda k: 1.0)
    out = plot_training(run)
    assert out == run / "training.png"
    w, h = _png_size(out)
    assert w > 300 and h > 300


def test_plot_training_on_a_run_in_progress(tmp_path):
    """A single row, no epochs.csv, no config, and a half-written last line."""
    run = tmp_path / "live"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "iteration,epoch,loss,tau,lr,collapse\n1,1,3.9,0.996,1e-5,0.98\n2,1,3."
    )
    out = plot_training(run, output=tmp_path / "plots" / "t.png")
    assert _png_size(out)[0] > 300
    summary = summarize_run(run)
    assert summary["iterations"] == 1 and summary["epochs"] == 1
    assert summary["wall_seconds"] is None and summary["samples_per_second"] is None
    assert summary["final_val_loss"] is None and summary["checkpoint_path"] is None
    assert summary["final_collapse"] == pytest.approx(0.98)
    assert "not written yet" in format_summary(summary)


def test_plot_training_without_metrics_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no metrics.csv"):
        plot_training(tmp_path)
    (tmp_path / "metrics.csv").write_text("iteration,epoch,loss,tau,lr,collapse\n")
    with pytest.raises(DataError, match="no complete row"):
        plot_training(tmp_path)


def test_summary_values_from_the_csvs(tmp_path):
    run = _write_run(tmp_path / "run", collapse=lambda k: 0.9 + 0.001 * k)
    (run / "checkpoints").mkdir()
    for e in (2, 10, 4):
        (run / "checkpoints" / f"checkpoint_{e}.pt").write_bytes(b"")
    (run / "encoder.pt").write_bytes(b"")
    s = summarize_run(run)
    assert s["iterations"] == 40 and s["epochs"] == 4
    assert s["wall_seconds"] == pytest.approx(40.0)
    assert s["batch_size"] == 4
    assert s["samples_per_second"] == pytest.approx(4 * 40 / 40.0)
    assert s["final_val_loss"] == pytest.approx(3.2)
    assert s["best_val_loss"] == pytest.approx(3.0) and s["best_val_epoch"] == 2
    assert s["final_train_loss"] == pytest.approx(2.0)
    assert s["final_collapse"] == pytest.approx(
        np.mean([0.9 + 0.001 * k for k in (37, 38, 39, 40)])
    )
    assert s["first_epoch_collapse"] == pytest.approx(
        np.mean([0.9 + 0.001 * k for k in range(1, 11)])
    )
    assert s["collapse_warning"] is False and s["collapse_message"] is None
    assert s["encoder_path"] == str(run / "encoder.pt")
    assert s["checkpoint_path"] == str(run / "checkpoints" / "checkpoint_10.pt")
    assert json.loads((run / "summary.json").read_text()) == s
    assert summarize_run(run, wall_seconds=80.0, write=False)[
        "samples_per_second"
    ] == pytest.approx(2.0)
    text = format_summary(s)
    assert "4 epochs, 40 iterations" in text and "4.00 samples/s" in text and "WARNING" not in text


def test_collapse_warning_below_the_threshold(tmp_path):
    run = _write_run(tmp_path / "run", collapse=lambda k: max(0.02, 1.0 - 0.03 * k))
    s = summarize_run(run)
    assert s["final_collapse"] == pytest.approx(0.02)
    assert s["collapse_warning"] is True and "0.020" in s["collapse_message"]
    assert "WARNING" in format_summary(s)
    assert plot_training(run).is_file()


def test_collapse_warning_for_a_large_relative_drop(tmp_path):
    """From ~2 to 0.3: above the absolute threshold, but below 25% of the first epoch."""
    run = _write_run(tmp_path / "run", collapse=lambda k: 2.0 if k <= 10 else 0.3)
    s = summarize_run(run)
    assert s["collapse_warning"] is True and "first-epoch mean" in s["collapse_message"]


def test_nan_validation_loss_is_null_in_json(tmp_path):
    nan = float("nan")
    run = _write_run(
        tmp_path / "run", collapse=lambda k: 1.0, val=(nan, nan, nan, nan), batch_size=None
    )
    s = summarize_run(run)
    assert s["final_val_loss"] is None and s["best_val_loss"] is None
    assert s["samples_per_second"] is None
    text = (run / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["final_val_loss"] is None


def test_read_csv_skips_broken_rows_and_smooth_is_debiased(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("iteration,loss\n1,2.0\niteration,loss\n2,x\n3,4.0\n4,")
    t = read_csv(p, ("iteration", "loss"))
    assert t["iteration"].tolist() == [1.0, 3.0, 4.0]
    assert np.isnan(t["loss"][-1])
    assert read_csv(tmp_path / "missing.csv", ("a",))["a"].shape == (0,)
    assert smooth(np.array([2.0, 2.0, 2.0, 2.0]), span=3).tolist() == [2.0, 2.0, 2.0, 2.0]
    assert smooth(np.array([np.nan, 1.0]), span=3)[1] == 1.0
