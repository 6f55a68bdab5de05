"""Frozen dense probe: a per-voxel linear classifier on frozen multi-scale encoder features.

    byol3d evaluate runs/ct --segmentation /data/labelled --labelled 1 3 6 --seeds 5
    byol3d evaluate runs/ct --segmentation data/demo_ct/classes.csv --test 6
    byol3d evaluate runs/endo --segmentation data/demo_endoscopy/frames.csv --test 12   # 2D frames

The most direct test of what a pretrained encoder's feature maps hold (vox2vec, Goncharov et
al. 2023, reports a frozen linear probe of 0.65 Dice against 0.78 fine-tuned on BTCV): nothing
but a 1x1x1 convolution is trained on top of the frozen encoder, so the Dice it reaches is the
encoder's, not a decoder's.

Protocol (nothing in it depends on the data set; 2D frames go through the same steps, with
pixels for voxels and a 1x1 convolution):

* **Data.** Pairs of an image and its label map (integer labels, 0 background), from a CSV with
  ``path`` (or ``image``) and ``segmentation`` (or ``label_map``) columns, or from a folder
  with ``images/`` + ``labels/`` (or nnU-Net's ``imagesTr/`` + ``labelsTr/``, the ``_0000``
  channel suffix dropped) holding the same file names. Both get the run's own preprocessing
  (:func:`byol3d.transforms.build_eval_transform`; labels resampled nearest-neighbour and
  cropped with the image; 2D label maps are single-channel images of integer labels). The
  last ``test`` pairs, sorted by image path (so frames of the last videos, for frames in
  per-video folders), are the fixed test set; the labelled training volumes are drawn from
  the rest.
* **Features.** ``layer1..layer3`` (strides 4, 8, 16) of the whole preprocessed volume in one
  forward pass (fully convolutional; volumes above ``max_voxels`` are seen in sliding windows
  of the pretraining crop), each map read at a voxel by linear interpolation between feature
  cells, cell ``j`` of a stride-``s`` map sitting on voxel ``s * j`` (where MONAI's padded
  strided convolutions centre it). 64 + 128 + 256 = 448 features per voxel for resnet10/18/34.
* **Classifier.** Multinomial logistic regression (a 1x1x1 convolution) on standardised
  features, trained with L-BFGS on a stratified sample of voxels of the labelled volumes (up
  to ``voxels_per_class`` per label and volume, each weighted by how many voxels it stands
  for, so the loss estimates the whole-volume loss) with a small L2 penalty.
* **Score.** Dice of each foreground label over each whole test volume (a label absent from
  both the truth and the prediction of a volume is skipped), averaged over test volumes, then
  over labels: "mean Dice".
* **Comparison.** The pretrained encoder and ``random`` random initialisations of the same
  architecture (:func:`byol3d.evaluation.features.random_encoder`) are probed with the same
  labelled volumes for every seed; the paired difference per seed is pretrained minus the
  mean of the random inits, summarised by its mean and 95% t interval
  (:mod:`byol3d.evaluation.stats`).

Outputs in ``output`` (default ``RUN_DIR/dense_probe``): ``dense_probe.json`` (settings,
every record, the summary), ``dense_probe.csv`` (one row per encoder, labelled count and
seed, with per-label Dice) and ``dense_probe.md`` (the table).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from byol3d.data.discovery import segmentation_pairs
from byol3d.data.readers import as_tensor
from byol3d.errors import DataError
from byol3d.evaluation.features import LoadedEncoder, load_encoder, random_encoder
from byol3d.evaluation.stats import (
    PairedDifference,
    dice_per_label,
    labelled_sets,
    paired_difference,
)
from byol3d.models.correspondence import feature_stride, upsample_to_voxels
from byol3d.models.encoders import layer_outputs
from byol3d.transforms import build_eval_transform

logger = logging.getLogger("byol3d")

__all__ = [
    "DenseFeatures",
    "dense_probe_run",
    "fit_linear_probe",
    "format_dense_report",
]

PROBE_LAYERS = ("layer1", "layer2", "layer3")


@dataclass
class DenseFeatures:
    """The frozen features of one volume: maps per layer, and voxel samples for training."""

    maps: dict[str, torch.Tensor]  # layer -> (C, *cells), float32 CPU
    strides: dict[str, int]
    size: tuple[int, ...]
    label: torch.Tensor  # (*size) int64


@torch.no_grad()
def volume_features(
    net: nn.Module,
    image: torch.Tensor,
    layers: Sequence[str] = PROBE_LAYERS,
    roi_size: Sequence[int] | None = None,
    max_voxels: int = 256**3,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``layer -> (C, *cells)`` maps of one preprocessed ``(C, *spatial)`` image, and strides.

    The whole image is one forward pass when it has at most ``max_voxels`` voxels (exact cell
    geometry); larger images are seen in sliding windows of ``roi_size`` (overlap 0.5).
    """
    x = as_tensor(image).float()
    param = next(net.parameters())
    x = x.unsqueeze(0).to(param.device)
    spatial = tuple(x.shape[2:])
    was_training = net.training
    net.eval()
    try:
        if math.prod(spatial) <= max_voxels or roi_size is None:
            outs = layer_outputs(net, x, layers)
        else:
            outs = sliding_window_inference(
                x, roi_size=tuple(roi_size), sw_batch_size=1, overlap=0.5, mode="gaussian",
                predictor=lambda w: tuple(layer_outputs(net, w, layers)), device="cpu",
            )  # fmt: skip
            outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    finally:
        net.train(was_training)
    maps = {name: o[0].float().cpu() for name, o in zip(layers, outs, strict=True)}
    strides = {}
    for name, m in maps.items():  # the axis with the most cells pins the stride down
        axis = int(np.argmax(m.shape[1:]))
        strides[name] = feature_stride(spatial[axis], m.shape[1 + axis])
    return maps, strides


def _sample_voxels(
    label: torch.Tensor, per_class: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified voxel sample: flat indices and weights (voxels each sample stands for)."""
    flat = label.reshape(-1)
    idx, weights = [], []
    for c in torch.unique(flat).tolist():
        where = torch.nonzero(flat == c).squeeze(1)
        take = where[torch.randperm(where.numel(), generator=gen)[:per_class]]
        idx.append(take)
        weights.append(torch.full((take.numel(),), where.numel() / take.numel()))
    return torch.cat(idx), torch.cat(weights)


def _features_at(feats: DenseFeatures, flat_idx: torch.Tensor) -> torch.Tensor:
    """``(P, C_total)`` features at flat voxel indices, interpolated as in upsample_to_voxels."""
    coords = torch.stack(torch.unravel_index(flat_idx, feats.size), dim=1).float()  # (P, dims)
    cols = []
    for name, fmap in feats.maps.items():
        cells = torch.tensor(fmap.shape[1:], dtype=torch.float32)
        u = coords / feats.strides[name]  # continuous cell index
        u = torch.minimum(u, cells - 1)  # past the last cell: its value
        g = 2 * u / (cells - 1).clamp_min(1) - 1  # align_corners=True normalisation
        g = g.flip(-1).reshape(1, -1, *([1] * (len(feats.size) - 1)), len(feats.size))
        sampled = F.grid_sample(fmap[None], g, mode="bilinear", align_corners=True)
        cols.append(sampled.reshape(fmap.shape[0], -1).T)
    return torch.cat(cols, dim=1)


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    weights: torch.Tensor | None = None,
    l2: float = 1e-4,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted multinomial logistic regression on standardised features (L-BFGS).

    Args:
        x: ``(P, C)`` features; y: ``(P,)`` labels in ``0..n_classes-1``.
        weights: per-sample weights (default 1).
        l2: penalty on the weights (not the bias), relative to the mean loss.

    Returns:
        ``(W (n_classes, C), b (n_classes,), mean (C,), std (C,))``: logits are
        ``((x - mean) / std) @ W.T + b``.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.ones(len(y)) if weights is None else weights.float()
    w = w / w.sum()
    W = torch.zeros(n_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(z @ W.T + b, y, reduction="none") * w).sum()
        loss = loss + l2 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().float(), b.detach().float(), mean.float(), std.float()


def predict_volume(feats: DenseFeatures, probe) -> torch.Tensor:
    """Arg-max labels ``(*size)`` of a fitted probe on one volume's maps.

    Linear all the way: each layer's logits are computed at its own resolution and then read
    at the voxels, which equals classifying the interpolated features voxel by voxel.
    """
    W, b, mean, std = probe
    logits = None
    start = 0
    for name, fmap in feats.maps.items():
        c = fmap.shape[0]
        w = W[:, start : start + c] / std[start : start + c]
        bias = -(w * mean[start : start + c]).sum(1)
        layer_logits = torch.einsum("kc,c...->k...", w, fmap) + bias.view(
            -1, *[1] * (fmap.ndim - 1)
        )
        up = upsample_to_voxels(layer_logits[None], feats.size, feats.strides[name])[0]
        logits = up if logits is None else logits + up
        start += c
    logits = logits + b.view(-1, *[1] * len(feats.size))
    return logits.argmax(0)


def _encoder_features(net, items, enc: LoadedEncoder, max_voxels, desc, progress):
    feats = []
    for image, label in tqdm(items, desc=desc, unit="volume", disable=not progress, leave=False):
        maps, strides = volume_features(net, image, roi_size=enc.roi_size, max_voxels=max_voxels)
        feats.append(DenseFeatures(maps, strides, tuple(label.shape), label))
    return feats


def _probe_scores(feats, pool, test, labelled, seeds, per_class, n_classes):
    """Mean Dice (and per label) of the probe for each (labelled count, seed)."""
    samples = {}
    for i in pool:
        gen = torch.Generator().manual_seed(1000 + i)
        idx, w = _sample_voxels(feats[i].label, per_class, gen)
        samples[i] = (_features_at(feats[i], idx), feats[i].label.reshape(-1)[idx], w)
    out = {}
    for n in labelled:
        for seed, chosen in enumerate(labelled_sets(pool, n, seeds)):
            x = torch.cat([samples[i][0] for i in chosen])
            y = torch.cat([samples[i][1] for i in chosen])
            w = torch.cat([samples[i][2] for i in chosen])
            probe = fit_linear_probe(x, y, n_classes, weights=w)
            dice = np.nanmean(
                np.stack([dice_per_label(predict_volume(feats[t], probe), feats[t].label, n_classes) for t in test]),
                axis=0,
            )  # fmt: skip
            out[(n, seed)] = dice
    return out


def dense_probe_run(
    source: str | Path | LoadedEncoder,
    segmentation: str | Path,
    output: str | Path | None = None,
    labelled: Sequence[int] = (1, 3, 6),
    seeds: int = 5,
    random_inits: int = 3,
    test: int | None = None,
    voxels_per_class: int = 2000,
    max_voxels: int = 256**3,
    device: str | torch.device = "cpu",
    progress: bool = True,
    others: Mapping[str, str | Path | LoadedEncoder] | None = None,
    name: str = "pretrained",
) -> dict[str, Any]:
    """Frozen dense probe of a run's encoder against random inits; see the module docstring.

    Args:
        source: run directory, ``encoder.pt`` or checkpoint (or a loaded encoder); its config
            sets the architecture, the preprocessing and the random baselines.
        segmentation: the labelled data (see :func:`segmentation_pairs`).
        output: where the report goes (default ``RUN_DIR/dense_probe``).
        labelled: numbers of labelled training volumes.
        seeds: labelled-set draws per number (the pairs of the comparison; >= 2 for a CI).
        random_inits: random initialisations of the architecture (>= 1).
        test: held-out volumes (default a quarter of the pairs, at least 1).
        voxels_per_class: voxel samples per label and training volume.
        max_voxels: larger volumes are seen in sliding windows.
        others: more pretrained encoders of the same architecture and preprocessing, by
            name, probed on the same volumes (e.g. a global and a global + dense run).
        name: what the tables call ``source``'s encoder.

    Returns:
        The report (also written to ``output``); ``summary[name][n]`` is the paired
        difference of encoder ``name`` against the random inits with ``n`` labelled volumes,
        ``between["B - A"][n]`` that of each of ``others`` (B) against ``source`` (A).

    Raises:
        DataError: too few volumes for the labelled counts and the test set, bad labels, or
            ``others`` that differ in architecture or preprocessing.
    """
    enc = source if isinstance(source, LoadedEncoder) else load_encoder(source, device=device)
    if seeds < 1 or random_inits < 1 or not labelled or min(labelled) < 1:
        raise DataError(
            f"need seeds >= 1, random_inits >= 1 and labelled counts >= 1, got seeds={seeds}, "
            f"random_inits={random_inits}, labelled={list(labelled)}"
        )
    pretrained = {name: enc}
    for other_name, other in (others or {}).items():
        o = other if isinstance(other, LoadedEncoder) else load_encoder(other, device=device)
        if _signature(o) != _signature(enc):
            raise DataError(f"encoder {other_name!r} differs from {str(enc.source)!r} in architecture or preprocessing")  # fmt: skip
        pretrained[other_name] = o
    pairs = segmentation_pairs(segmentation)
    n_test = max(1, len(pairs) // 4) if test is None else int(test)
    if n_test < 1 or len(pairs) - n_test < max(labelled):
        raise DataError(
            f"{len(pairs)} labelled volumes cannot give {n_test} test volumes and "
            f"{max(labelled)} training volumes; lower --test or --labelled"
        )
    items = _load_pairs(enc, pairs, progress)
    n_classes = int(max(int(lab.max()) for _, lab in items)) + 1
    if n_classes < 2:
        raise DataError(f"the label maps of {str(segmentation)!r} hold no foreground label")
    pool, test_idx = list(range(len(items) - n_test)), list(range(len(items) - n_test, len(items)))
    nets = {name: e.encoder for name, e in pretrained.items()}
    nets.update({f"random_{i}": random_encoder(enc, i) for i in range(random_inits)})
    scores = {}
    for key, net in nets.items():
        feats = _encoder_features(net, items, enc, max_voxels, f"features ({key})", progress)
        scores[key] = _probe_scores(feats, pool, test_idx, labelled, seeds, voxels_per_class, n_classes)  # fmt: skip
        del feats
    report = _report(enc, list(pretrained), segmentation, pairs, test_idx, n_classes, labelled, seeds, random_inits, scores, voxels_per_class)  # fmt: skip
    out = Path(output) if output is not None else _run_dir(source, enc) / "dense_probe"
    _write(out, report)
    report["output"] = str(out)
    return report


def _signature(enc: LoadedEncoder) -> tuple:
    return (enc.name, tuple(sorted((k, str(v)) for k, v in enc.preprocessing.items())))


def _load_pairs(
    enc: LoadedEncoder, pairs, progress: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image and label map through the run's preprocessing, as plain tensors."""
    transform = build_eval_transform(enc.config, label_key="label")
    items = []
    for image, label in tqdm(pairs, desc="preprocess", unit="volume", disable=not progress):
        d = transform({"image": image, "label": label})
        img, lab = as_tensor(d["image"]), as_tensor(d["label"])
        lab = lab[0].long()
        if (lab < 0).any():
            raise DataError(f"{label!r} holds negative labels; labels must be 0 (background), 1, 2, ...")  # fmt: skip
        items.append((img.float(), lab))
    return items


def _run_dir(source, enc: LoadedEncoder) -> Path:
    if not isinstance(source, LoadedEncoder) and Path(source).is_dir():
        return Path(source)
    return Path(enc.source).parent if enc.source is not None else Path(".")


def _report(enc, names, segmentation, pairs, test_idx, n_classes, labelled, seeds, random_inits, scores, per_class):  # fmt: skip
    records, summary = [], {}
    for name, by_key in scores.items():
        for (n, seed), dice in by_key.items():
            records.append({"encoder": name, "labelled": n, "seed": seed, "mean_dice": float(np.nanmean(dice)), "dice": dice.tolist()})  # fmt: skip
    rnd = {
        n: [
            float(np.mean([np.nanmean(scores[f"random_{i}"][(n, s)]) for i in range(random_inits)]))
            for s in range(seeds)
        ]  # fmt: skip
        for n in labelled
    }

    def per_seed(name, n):
        return [float(np.nanmean(scores[name][(n, s)])) for s in range(seeds)]

    for name in names:
        summary[name] = {str(n): paired_difference(per_seed(name, n), rnd[n]).as_dict() for n in labelled}  # fmt: skip
    # every further encoder against the first, on the same labelled sets (e.g. global+dense - global)
    between = {
        f"{other} - {names[0]}": {
            str(n): paired_difference(per_seed(other, n), per_seed(names[0], n)).as_dict()
            for n in labelled
        }  # fmt: skip
        for other in names[1:]
    }
    return {
        "source": str(enc.source),
        "encoder": enc.name,
        "segmentation": str(segmentation),
        "n_volumes": len(pairs),
        "test": [pairs[i][0] for i in test_idx],
        "n_classes": n_classes,
        "labelled": list(labelled),
        "seeds": seeds,
        "random_inits": random_inits,
        "layers": list(PROBE_LAYERS),
        "voxels_per_class": per_class,
        "summary": summary,
        "between": between,
        "records": records,
    }


def _write(out: Path, report: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense_probe.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "dense_probe.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        labels = [f"dice_{c}" for c in range(1, report["n_classes"])]
        writer.writerow(["encoder", "labelled", "seed", "mean_dice", *labels])
        for r in report["records"]:
            writer.writerow([r["encoder"], r["labelled"], r["seed"], f"{r['mean_dice']:.4f}",
                             *(f"{d:.4f}" for d in r["dice"])])  # fmt: skip
    (out / "dense_probe.md").write_text(format_dense_report(report))


def format_dense_report(report: Mapping[str, Any]) -> str:
    """The markdown table of a :func:`dense_probe_run` report."""
    lines = [
        f"Frozen dense probe ({'+'.join(report['layers'])}), {report['encoder']}: "
        f"{report['n_volumes']} labelled volumes, {len(report['test'])} held out for testing, "
        f"{report['seeds']} seeds, {report['random_inits']} random inits",
        "",
        "| encoder | labelled | pretrained | random init | paired difference [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name, by_n in report["summary"].items():
        for n, s in by_n.items():
            lines.append(
                f"| {name} | {n} | {s['mean_a']:.3f} | {s['mean_b']:.3f} | {_difference(s)} |"
            )
    if report.get("between"):
        ns = report["labelled"]
        lines += ["", "Pretrained encoders against each other (same labelled sets, paired by set):", "",
                  "| comparison | " + " | ".join(f"{n} labelled" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]  # fmt: skip
        for name, by_n in report["between"].items():
            lines.append(f"| {name} | " + " | ".join(_difference(by_n[str(n)]) for n in ns) + " |")
    return "\n".join(lines) + "\n"


def _difference(s: Mapping[str, Any]) -> str:
    """A summary dict of the report (``PairedDifference.as_dict``) as its table cell."""
    return PairedDifference(**s).format()
