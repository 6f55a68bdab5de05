"""Representation quality, side by side: byol3d's 2D BYOL vs lightly's BYOL example loop.

    make bench ARGS="--quality --json quality.json --markdown quality.md"   # 3 seeds x 200 steps
    make bench ARGS="--quality --quick"                                     # 1 seed x 40 steps
    make bench ARGS="--quality --set transforms.blur_sigma=[0.1,2.0]"       # a byol3d config change

Both sides train the same MONAI ResNet-10 2D (``byol3d.build_encoder``, built right after
``torch.manual_seed(seed)``: the same initialisation on both sides), with projector and
predictor MLPs of the same sizes (4096 hidden, 256 out: byol3d's and lightly's defaults),
``AdamW`` with the same lr and weight decay, the same base tau, batch size, number of steps,
input size and normalisation, on the same files: 328 tiles of real photos
(:mod:`bench_photos`).

* byol3d: ``byol3d.training.pretrain(cfg)``, the trainer ``byol3d pretrain`` runs, with
  ``configs/demo_endoscopy.yaml`` (byol3d's 2D CPU defaults: its views, warm-up + cosine lr,
  cosine tau per step) and the shared settings as overrides (plus ``--set`` ones).
* lightly: lightly's ``examples/pytorch/byol.py`` as written there: ``BYOLTransform`` of
  ``BYOLView1Transform``/``BYOLView2Transform`` at the same input size (its defaults otherwise;
  ``normalize`` set to the data's statistics, as byol3d's), ``BYOLProjectionHead`` and
  ``BYOLPredictionHead``, ``deactivate_requires_grad``, ``update_momentum`` with
  ``cosine_schedule(epoch, epochs, base_tau, 1)``, one online and one momentum forward per view,
  ``NegativeCosineSimilarity``, a shuffled ``DataLoader`` with ``drop_last``; the optimizer is
  AdamW (the example's SGD replaced, so the optimizer matches) at a constant lr, as the example
  keeps it.
* random: the same architecture right after ``torch.manual_seed(seed)``, untrained (the
  initialisation both sides start from).

Every encoder is then evaluated identically (:mod:`byol3d.evaluation.probe`): frozen
``avgpool`` features of every tile through the run's own evaluation transform
(``build_eval_transform``: [0, 1] and ``transforms.mean/std``, the training's normalisation),
linear probe (logistic regression, C by inner CV) and kNN (k=5, cosine), 5-fold stratified
CV with the seed as split seed. Seeds pair the sides: seed ``s`` sets the init, the data order
and the augmentation draws of both; ``paired_difference`` gives each comparison's mean
difference and 95% t interval. ``ratios.quality_knn_vs_lightly`` = byol3d's mean kNN accuracy
/ lightly's.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_lightly import train_lightly
from bench_photos import photo_tiles, write_tiles
from torch import nn

from byol3d import build_encoder
from byol3d.config import load_config
from byol3d.data.discovery import read_image_list
from byol3d.data.stats import compute_mean_std
from byol3d.evaluation.features import extract_features, load_encoder
from byol3d.evaluation.probe import knn_accuracy, linear_probe_accuracy
from byol3d.evaluation.stats import paired_difference
from byol3d.transforms import build_eval_transform, build_transforms

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_endoscopy.yaml"
SIDES = ("byol3d", "lightly", "random")
METRICS = ("linear_probe", "knn")
#: (a, b) pairs reported as a - b per seed
PAIRS = (("byol3d", "lightly"), ("byol3d", "random"), ("lightly", "random"))


@dataclass
class QualitySetup:
    """The settings both sides share."""

    encoder: str = "resnet10"
    size: int = 64
    tile: int = 48
    batch: int = 32
    steps: int = 200
    seeds: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    base_tau: float = 0.99
    hidden_dim: int = 4096
    projection_dim: int = 256
    num_workers: int = 1
    k: int = 5
    folds: int = 5
    #: the linear probe's C grid: 4 of ``byol3d evaluate``'s 7 values (10^-4 .. 10^2), to save
    #: CPU time (the inner CV fits dominate the evaluation); the same for every encoder
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    device: str = "cpu"
    overrides: list[str] = field(default_factory=list)  # extra byol3d config overrides

    def epochs(self, n_files: int) -> int:
        """Whole epochs giving at least ``steps`` optimizer steps (both sides drop the last
        partial batch)."""
        return max(1, math.ceil(self.steps / max(1, n_files // self.batch)))


PRESETS = {
    "tiny": dict(size=32, batch=16, steps=2, seeds=1, hidden_dim=64, projection_dim=16, folds=2),
    "quick": dict(steps=40, seeds=1),
    "full": dict(),
}


def byol3d_config(s: QualitySetup, root: Path, out: Path, seed: int, mean, std, epochs: int):
    """byol3d's 2D demo config with the shared settings (and ``s.overrides``) applied."""
    shared = [
        f"output_dir={out}",
        f"seed={seed}",
        f"data.root={root}",
        "data.csv=null",
        "data.val_fraction=0.0",
        f"data.num_workers={s.num_workers}",
        f"model.encoder={s.encoder}",
        f"model.hidden_dim={s.hidden_dim}",
        f"model.projection_dim={s.projection_dim}",
        f"transforms.roi_size=[{s.size},{s.size}]",
        "transforms.frame_size=null",
        f"transforms.mean={list(mean)}",
        f"transforms.std={list(std)}",
        f"train.max_epochs={epochs}",
        f"train.batch_size={s.batch}",
        f"train.lr={s.lr}",
        f"train.weight_decay={s.weight_decay}",
        f"train.base_tau={s.base_tau}",
        f"train.device={s.device}",
        f"train.checkpoint_every={epochs}",
        "train.keep_checkpoints=1",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    return load_config(BASE_CONFIG, [*shared, *s.overrides])


def train_byol3d(cfg) -> tuple[nn.Module, dict]:
    """``pretrain(cfg)``; the trained online encoder as ``byol3d evaluate`` loads it."""
    from byol3d.training.pretrain import pretrain

    result = pretrain(cfg)
    losses = _column(result.metrics_path, "loss")
    return load_encoder(result.output_dir).encoder, {
        "steps": result.iterations,
        "final_loss": float(np.mean(losses[-5:])) if losses else None,
    }


def _column(path: Path, name: str) -> list[float]:
    import csv

    with open(path) as fh:
        return [float(r[name]) for r in csv.DictReader(fh) if r.get(name) not in (None, "")]


def random_init(s: QualitySetup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(s.encoder, spatial_dims=2, in_channels=3).to(s.device).eval()


def evaluate(net: nn.Module, images, labels, s: QualitySetup, seed: int) -> dict[str, float]:
    """Linear probe and kNN accuracy of frozen ``avgpool`` features (byol3d.evaluation).

    The tiles are exactly the crop size, so :func:`extract_features`' sliding-window embedding
    is the encoder's own forward (its docstring says so; checked on the first tile): the
    features are computed in batches of 64 for speed.
    """
    net = net.to(s.device).eval()
    with torch.no_grad():
        feats = torch.cat([net(torch.stack(images[i : i + 64]).to(s.device)).flatten(1).cpu()
                           for i in range(0, len(images), 64)]).numpy()  # fmt: skip
    reference = extract_features(net, images[:1], roi_size=(s.size, s.size))
    if not np.allclose(feats[:1], reference, rtol=1e-4, atol=1e-5):
        raise RuntimeError("batched features differ from extract_features on the first tile")
    return {
        "linear_probe": linear_probe_accuracy(feats, labels, s.folds, seed=seed, c_grid=s.c_grid),
        "knn": knn_accuracy(feats, labels, s.k, s.folds, seed=seed),
    }


def summarise(records: Sequence[dict]) -> dict:
    """Per side and metric the mean and sd over seeds; per pair the paired difference; ratios.

    ``records`` hold ``seed``, ``side`` and one accuracy per metric. Sides missing from some
    seed are left out of the pairs that need them.
    """
    by = {(r["side"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    summary = {}
    for side in SIDES:
        for metric in METRICS:
            v = [by[side, sd][metric] for sd in seeds if (side, sd) in by]
            if v:
                summary[f"{side}/{metric}"] = {
                    "mean": float(np.mean(v)),
                    "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v),
                }
    paired = {}
    for a, b in PAIRS:
        both = [sd for sd in seeds if (a, sd) in by and (b, sd) in by]
        for metric in METRICS:
            if both:
                d = paired_difference([by[a, sd][metric] for sd in both],
                                      [by[b, sd][metric] for sd in both])  # fmt: skip
                paired[f"{a}-{b}/{metric}"] = {**d.as_dict(), "text": d.format()}

    def ratio(a, b, metric):
        va, vb = summary.get(f"{a}/{metric}"), summary.get(f"{b}/{metric}")
        return round(va["mean"] / vb["mean"], 4) if va and vb and vb["mean"] else None

    ratios = {
        "quality_knn_vs_lightly": ratio("byol3d", "lightly", "knn"),
        "quality_probe_vs_lightly": ratio("byol3d", "lightly", "linear_probe"),
        "quality_knn_vs_random": ratio("byol3d", "random", "knn"),
        "quality_probe_vs_random": ratio("byol3d", "random", "linear_probe"),
    }
    return {"summary": summary, "paired": paired, "ratios": ratios}


def prepare_data(work: Path, s: QualitySetup, log) -> dict:
    """Write the photo tiles; their files, labels, class counts and mean/std."""
    tiles = photo_tiles(tile=s.tile, size=s.size)
    csv_path = write_tiles(tiles, work / "tiles")
    rows = read_image_list(csv_path, require_label=True)
    files = [r["image"] for r in rows]
    cfg = load_config(BASE_CONFIG, [f"transforms.roi_size=[{s.size},{s.size}]",
                                    "transforms.frame_size=null"])  # fmt: skip
    mean, std = compute_mean_std(files, build_transforms(cfg)[0], max_files=None)
    labels = np.array([r["label"] for r in rows])
    counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    log(f"data: {len(files)} tiles of {s.tile} px resized to {s.size}, {len(counts)} classes, "
        f"mean {mean} std {std}")  # fmt: skip
    return {"root": work / "tiles" / "images", "files": files, "labels": labels,
            "counts": counts, "mean": mean, "std": std}  # fmt: skip


def run_seed(s: QualitySetup, data: dict, seed: int, work: Path, sides, has_lightly: bool, log):
    """Train both sides for one seed and evaluate them and the random init; one record each."""
    epochs = s.epochs(len(data["files"]))
    cfg = byol3d_config(s, data["root"], work / f"byol3d_seed{seed}", seed,
                        data["mean"], data["std"], epochs)  # fmt: skip
    images = [build_eval_transform(cfg)({"image": f})["image"] for f in data["files"]]
    trainers = {
        "byol3d": lambda: train_byol3d(cfg),
        "lightly": (
            lambda: train_lightly(s, data["files"], seed, data["mean"], data["std"], epochs)
        )
        if has_lightly
        else None,
        "random": lambda: (random_init(s, seed), {"steps": 0, "final_loss": None}),
    }
    records = []
    for side, train in trainers.items():
        if side not in sides:
            continue
        if train is None:
            log(f"seed {seed}: {side} not installed (make bench installs it in .bench-venv)")
            continue
        t = time.perf_counter()
        net, info = train()
        seconds, t = time.perf_counter() - t, time.perf_counter()
        scores = evaluate(net, images, data["labels"], s, seed)
        records.append({"seed": seed, "side": side, **scores, **info,
                        "train_seconds": round(seconds, 1)})  # fmt: skip
        log(f"seed {seed} {side}: probe {scores['linear_probe']:.3f} kNN {scores['knn']:.3f} "
            f"({info['steps']} steps, {seconds:.0f} s; evaluation {time.perf_counter() - t:.0f} s)")  # fmt: skip
    return records


def run_quality(
    preset: str, log, seeds=None, steps=None, overrides=(), device="cpu", work=None, sides=SIDES
):
    """The whole comparison; the result dict benchmark.py writes (without machine/versions)."""
    s = QualitySetup(**PRESETS[preset], device=device, overrides=list(overrides))
    s.seeds, s.steps = seeds or s.seeds, steps or s.steps
    has_lightly = _available("lightly") and _available("torchvision")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="byol3d-quality-") as tmp:
        work_dir = Path(work) if work else Path(tmp)
        data = prepare_data(work_dir, s, log)
        records = []
        for seed in range(s.seeds):
            records += run_seed(s, data, seed, work_dir, sides, has_lightly, log)
    n = len(data["files"])
    return {
        "mode": "quality",
        "sides": list(sides),
        "preset": preset,
        "seconds": round(time.perf_counter() - started, 1),
        "setup": {**asdict(s), "epochs": s.epochs(n), "steps_per_epoch": n // s.batch},
        "data": {
            "n_images": n,
            "classes": data["counts"],
            "chance": max(data["counts"].values()) / n,
            "mean": data["mean"],
            "std": data["std"],
            "source": "tiles of sklearn china.jpg, flower.jpg and matplotlib grace_hopper.jpg",
        },
        "records": records,
        **summarise(records),
    }


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 - e.g. torchvision failing to load its operators
        return False


def quality_markdown(result: dict) -> str:
    """The quality table (mean +- sd over seeds) and the paired differences, as markdown."""
    s, d = result["setup"], result["data"]
    lines = [
        f"{d['n_images']} tiles, {len(d['classes'])} classes (chance {d['chance']:.3f}); "
        f"{s['encoder']} 2D at {s['size']} px, batch {s['batch']}, {s['epochs']} epochs x "
        f"{s['steps_per_epoch']} steps, AdamW lr {s['lr']} wd {s['weight_decay']}, base tau "
        f"{s['base_tau']}, heads {s['hidden_dim']}/{s['projection_dim']}; "
        f"{s['folds']}-fold CV, kNN k={s['k']}; seeds {s['seeds']}"
        + (f"; byol3d overrides: {' '.join(s['overrides'])}" if s["overrides"] else ""),
        "",
        "| encoder | linear probe | kNN | steps | train s (mean) |",
        "|---|---|---|---|---|",
    ]
    for side in SIDES:
        recs = [r for r in result["records"] if r["side"] == side]
        if not recs:
            why = "not installed" if side in result.get("sides", SIDES) else "not run (--sides)"
            lines.append(f"| {side} | {why} | - | - | - |")
            continue
        p, k = result["summary"][f"{side}/linear_probe"], result["summary"][f"{side}/knn"]
        secs = np.mean([r["train_seconds"] for r in recs])
        lines.append(f"| {side} | {p['mean']:.3f} +- {p['sd']:.3f} | {k['mean']:.3f} +- "
                     f"{k['sd']:.3f} | {recs[0]['steps']} | {secs:.0f} |")  # fmt: skip
    lines += ["", "| paired difference (per seed) | linear probe [95% CI] | kNN [95% CI] |",
              "|---|---|---|"]  # fmt: skip
    for a, b in PAIRS:
        p, k = result["paired"].get(f"{a}-{b}/linear_probe"), result["paired"].get(f"{a}-{b}/knn")
        if p and k:
            lines.append(f"| {a} - {b} | {p['text']} | {k['text']} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.3f}'} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"
