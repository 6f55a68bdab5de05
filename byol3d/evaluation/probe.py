"""Label-efficient evaluation of frozen embeddings: linear probe and kNN, pretrained vs random.

    byol3d evaluate runs/ct --csv data/demo_ct/classes.csv
    byol3d evaluate runs/ct --csv labels.csv --root /data/ct --folds 5 --seeds 3 --k 5

The labels CSV has a ``label`` column and a ``path`` column (relative to the CSV's folder or
``--root``) or an ``id`` column (a file under ``--root`` whose name without extension is the
id). ``byol3d demo-data`` writes such a ``classes.csv``.

Protocol (nothing in it depends on the data set):

* Embeddings: the run's preprocessing and sliding-window global average pooling
  (:func:`byol3d.evaluation.features.extract_features`), for the pretrained encoder and for ``seeds``
  randomly initialised encoders of the same architecture. Random encoder ``i`` is built after
  ``torch.manual_seed(run_seed + i)``, as pretraining builds its encoder, so random encoder 0
  is exactly the initialisation the pretrained one started from.
* Linear probe: standardise (fit on the training folds), then ``LogisticRegression``
  whose ``C`` is chosen from ``10^-4 .. 10^2`` by an inner stratified 3-fold CV on the training
  folds only. kNN: standardise, cosine distance, ``k`` neighbours (default 5), majority vote.
* Accuracy of the out-of-fold predictions of a stratified ``folds``-fold CV (default 5;
  fewer when a class is smaller), repeated for ``seeds`` split seeds; the table gives the mean
  and the standard deviation over seeds (for random encoders, seed ``i`` also draws init ``i``).

Outputs in ``--output`` (default ``RUN_DIR/evaluation``): ``evaluation.json``,
``evaluation.csv`` (one row per encoder, method and seed), ``evaluation.md`` (the table).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from byol3d.data.discovery import read_image_list
from byol3d.errors import DataError
from byol3d.evaluation.features import extract_features, load_encoder, random_encoder

logger = logging.getLogger("byol3d")


def loo_knn_accuracy(features: torch.Tensor, labels: Sequence, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-NN majority vote under cosine similarity.

    Ties between classes go to the class whose votes have the larger summed similarity.

    >>> f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> loo_knn_accuracy(f, [0, 0, 1, 1], k=1)
    1.0
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError("the kNN monitor needs at least 2 labelled volumes")
    k = max(1, min(k, n - 1))
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    f = nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    top_sim, top = sim.topk(k, dim=1)
    votes = torch.zeros(n, len(classes), dtype=torch.float64)
    votes.scatter_add_(1, y[top], torch.ones_like(top_sim))
    votes += 1e-6 * torch.zeros_like(votes).scatter_add_(1, y[top], top_sim)  # tie-break
    return float((votes.argmax(1) == y).double().mean())


C_GRID = tuple(10.0**e for e in range(-4, 3))


def _folds(labels: np.ndarray, folds: int) -> int:
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < 2:
        raise DataError("every class needs at least 2 labelled images for cross-validation")
    return max(2, min(folds, smallest))


def _cv_accuracy(
    make_model, features: np.ndarray, labels: np.ndarray, folds: int, seed: int
) -> float:
    """Accuracy of the out-of-fold predictions; ``make_model(train_labels)`` builds each fold's model."""

    cv = StratifiedKFold(n_splits=_folds(labels, folds), shuffle=True, random_state=seed)
    pred = np.empty_like(labels)
    for train, test in cv.split(features, labels):
        model = make_model(labels[train]).fit(features[train], labels[train])
        pred[test] = model.predict(features[test])
    return float(np.mean(pred == labels))


def linear_probe_accuracy(
    features: np.ndarray,
    labels: Sequence,
    folds: int = 5,
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
) -> float:
    """Cross-validated accuracy of a logistic regression on standardised frozen features.

    ``C`` is chosen per outer fold from ``c_grid`` by an inner stratified CV (3 folds, fewer
    when a class has fewer training images; ``C = 1`` when a class has only one) on that
    fold's training part (``GridSearchCV``); the scaler is fitted on training parts only.
    """

    labels = np.asarray(labels)

    def make(train_labels: np.ndarray):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        smallest = int(np.unique(train_labels, return_counts=True)[1].min())
        if smallest < 2:
            return probe
        inner = StratifiedKFold(n_splits=min(3, smallest), shuffle=True, random_state=seed)
        return GridSearchCV(probe, {"logisticregression__C": list(c_grid)}, cv=inner)

    return _cv_accuracy(make, np.asarray(features, dtype=np.float64), labels, folds, seed)


def knn_accuracy(
    features: np.ndarray, labels: Sequence, k: int = 5, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy of a k-nearest-neighbour vote (cosine distance, standardised)."""

    if k < 1:
        raise ValueError(f"invalid k {k!r}, must be >= 1")

    def make(train_labels: np.ndarray):
        n = min(k, len(train_labels))
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=n, metric="cosine"))

    return _cv_accuracy(
        make, np.asarray(features, dtype=np.float64), np.asarray(labels), folds, seed
    )


def _features_of_all(
    encoders: dict[str, torch.nn.Module], rows, preprocess, roi, overlap, progress
):

    feats: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    for row in tqdm(rows, desc="embed", unit="image", disable=not progress):
        image = preprocess({"image": row["image"]})["image"]
        for name, net in encoders.items():  # each image preprocessed once for all encoders
            feats[name].append(extract_features(net, [image], roi_size=roi, overlap=overlap)[0])
    return {name: np.stack(v) for name, v in feats.items()}


def evaluate_run(
    source: str | Path,
    csv_path: str | Path,
    root: str | Path | None = None,
    output: str | Path | None = None,
    folds: int = 5,
    seeds: int = 3,
    k: int = 5,
    overlap: float = 0.25,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear probe and kNN accuracy of a run's encoder and of random encoders, one report.

    See the module docstring for the protocol. Returns the report (also written as
    ``evaluation.json``/``.csv``/``.md`` in ``output``, default ``RUN_DIR/evaluation``).
    """

    if seeds < 1 or folds < 2:
        raise DataError(f"need seeds >= 1 and folds >= 2, got seeds={seeds}, folds={folds}")
    enc = load_encoder(source)
    rows = read_image_list(csv_path, root=root, require_label=True, channels=enc.config["data"]["channels"])  # fmt: skip
    labels = np.array([r["label"] for r in rows])
    encoders = {"pretrained": enc.encoder}
    for i in range(seeds):
        encoders[f"random_{i}"] = random_encoder(enc, i)
    feats = _features_of_all(encoders, rows, enc.preprocess, enc.roi_size, overlap, progress)
    records = []
    for i in range(seeds):
        for variant, key in (("pretrained", "pretrained"), ("random", f"random_{i}")):
            records.append({"encoder": variant, "method": "linear_probe", "seed": i,
                            "accuracy": linear_probe_accuracy(feats[key], labels, folds, seed=i)})  # fmt: skip
            records.append({"encoder": variant, "method": f"knn_k{k}", "seed": i,
                            "accuracy": knn_accuracy(feats[key], labels, k, folds, seed=i)})  # fmt: skip
    summary = {}
    for variant in ("pretrained", "random"):
        for method in ("linear_probe", f"knn_k{k}"):
            acc = [
                r["accuracy"] for r in records if r["encoder"] == variant and r["method"] == method
            ]
            summary[f"{variant}/{method}"] = {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "n": len(acc)}  # fmt: skip
    counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    report = {
        "source": str(enc.source),
        "encoder": enc.name,
        "labels_csv": str(csv_path),
        "n_images": len(rows),
        "classes": counts,
        "chance": max(counts.values()) / len(rows),
        "folds": _folds(labels, folds),
        "seeds": seeds,
        "k": k,
        "summary": summary,
        "records": records,
    }
    out = Path(output) if output is not None else Path(source if Path(source).is_dir() else enc.source.parent) / "evaluation"  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "evaluation.csv", "w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["encoder", "method", "seed", "accuracy"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(records)
    (out / "evaluation.md").write_text(format_report(report))
    np.save(out / "features_pretrained.npy", feats["pretrained"].astype(np.float32))
    report["output"] = str(out)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The markdown table of an :func:`evaluate_run` report."""
    k = report["k"]
    lines = [
        f"{report['n_images']} images, classes {report['classes']} (chance {report['chance']:.3f}), "
        f"{report['folds']}-fold CV x {report['seeds']} seeds, {report['encoder']}",
        "",
        f"| encoder | linear probe | kNN (k={k}) |",
        "|---|---|---|",
    ]
    for variant in ("pretrained", "random"):
        probe, knn = (
            report["summary"][f"{variant}/linear_probe"],
            report["summary"][f"{variant}/knn_k{k}"],
        )
        lines.append(f"| {variant} | {probe['mean']:.3f} +- {probe['std']:.3f} | {knn['mean']:.3f} +- {knn['std']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
