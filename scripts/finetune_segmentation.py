"""Label-efficient segmentation: the run's downstream network, pretrained encoder vs from scratch.

    byol3d demo-data data/eval_ct --n 48
    byol3d pretrain configs/demo_ct.yaml data.root=data/eval_ct/images output_dir=runs/eval_global
    python scripts/finetune_segmentation.py --data data/eval_ct --run global=runs/eval_global \
        --output runs/seg_eval
    python scripts/finetune_segmentation.py --data data/eval_ct --run global=runs/eval_global \
        --run dense=runs/eval_dense --output runs/seg_eval          # several runs side by side
    python scripts/finetune_segmentation.py ... --quick             # a smoke test (seconds)

Protocol. ``--data`` holds image / label-map pairs as ``byol3d evaluate --segmentation`` reads
them (:func:`byol3d.data.discovery.segmentation_pairs`: a ``classes.csv`` whose
``segmentation`` column names a label volume per image, as ``byol3d demo-data`` writes with
labels 0..7, or ``images/`` + ``labels/``, or ``imagesTr/`` + ``labelsTr/``). Images
and labels get the runs' own preprocessing (orientation RAS, ``pixdim``, intensity rule, crop to
the body, pad; labels resampled with nearest neighbour), checked to equal the pretraining
preprocessing of the image. The last ``--test`` volumes (sorted by path) are a fixed test set;
for each seed, ``n`` training volumes (``--labelled``, default 1 3 6) are drawn from the
others by :func:`byol3d.evaluation.stats.labelled_sets` (distinct sets for distinct seeds, the
same as ``byol3d evaluate --segmentation`` draws), the same volumes for every variant. Each variant ("scratch" and one per ``--run``)
builds the network the run's encoder belongs to after ``torch.manual_seed(seed)``
(:func:`byol3d.evaluation.export.build_segmentation_net`: ``FlexibleUNet(backbone=<run's
ResNet>)``, SwinUNETR, SegResNet, or nnU-Net's network of the run's plans), loads the
encoder with ``byol3d.load_into`` (not for scratch), and trains all weights for
``--iterations`` Adam steps on ``--crop`` crops (batch ``--batch``) with ``DiceCELoss``, each
crop centred on a voxel of a label drawn uniformly (``--crop-sampling classes``, as MONAI's
``RandCropByLabelClassesd``; ``uniform`` places crops anywhere);
the learning rate ``--lr`` decays to 0 on a cosine. Scratch trains every weight at ``--lr``; a
pretrained encoder trains at ``--encoder-lr`` times it (0.1 by default) and can be held frozen
for the first ``--warmup`` steps while the random decoder catches up (0 by default). The score is the Dice of each foreground label on the whole test volumes
(sliding window), averaged over test volumes and then over labels.

Outputs in ``--output``: ``results.csv`` (one row per variant, n and seed, with per-label
Dice), ``summary.csv`` and ``summary.md`` (mean and std over seeds), ``dice_vs_labelled.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import SpatialPadd
from monai.transforms.utils import generate_label_classes_crop_centers, map_classes_to_indices

import byol3d
from byol3d.data.discovery import segmentation_pairs
from byol3d.data.synthetic_ct import LABEL_NAMES
from byol3d.errors import Byol3dError, DataError
from byol3d.evaluation.export import build_segmentation_net, encoder_modules
from byol3d.evaluation.features import LoadedEncoder
from byol3d.evaluation.stats import dice_per_label, labelled_sets, paired_difference
from byol3d.transforms import build_eval_transform

DECODER = (64, 32, 16, 16, 8)  # a small decoder: the encoder carries most of the capacity


def joint_preprocess(enc: LoadedEncoder):
    """The run's own preprocessing applied to an image and its label map together."""
    return build_eval_transform(enc.config, label_key="label")


class CropSampler:
    """Training batches of ``crop``-sized boxes from (image, label) volumes.

    ``balanced`` (the default, ``--crop-sampling classes``): each box is centred on a voxel of
    a label drawn uniformly from the labels present in the volume, background included
    (MONAI's ``map_classes_to_indices`` / ``generate_label_classes_crop_centers``, the
    sampling of ``RandCropByLabelClassesd``), so small organs are seen as often as large ones
    and a 32^3 box is not mostly background. ``uniform``: boxes placed uniformly at random.
    The volume of each box is drawn uniformly; every draw comes from ``seed``.
    """

    def __init__(self, volumes, crop: int, n_labels: int, balanced: bool, seed: int):
        self.volumes, self.crop, self.balanced = volumes, crop, balanced
        self.gen = torch.Generator().manual_seed(seed)
        self.rand_state = np.random.RandomState(seed)
        self.indices = []
        if balanced:
            for _, label in volumes:
                idx = map_classes_to_indices(label, num_classes=n_labels)
                self.indices.append([i for i in idx if len(i)])  # labels present in the volume

    def __call__(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for _ in range(batch):
            k = int(torch.randint(len(self.volumes), (1,), generator=self.gen))
            image, label = self.volumes[k]
            shape = image.shape[1:]
            if self.balanced:
                (centre,) = generate_label_classes_crop_centers(
                    [self.crop] * len(shape), 1, shape, self.indices[k],
                    rand_state=self.rand_state, warn=False,
                )  # fmt: skip
                start = [min(max(int(c) - self.crop // 2, 0), s - self.crop) for c, s in zip(centre, shape)]  # fmt: skip
            else:
                start = [int(torch.randint(s - self.crop + 1, (1,), generator=self.gen)) for s in shape]  # fmt: skip
            box = (slice(None), *(slice(s, s + self.crop) for s in start))
            images.append(image[box])
            labels.append(label[box])
        return torch.stack(images), torch.stack(labels)


def make_optimizer(net, pretrained: bool, args) -> torch.optim.Optimizer:
    """Adam over two groups: the encoder at ``lr * encoder_lr`` when pretrained, the rest at ``lr``.

    A from-scratch network trains every weight at ``lr`` (its usual recipe). A pretrained
    encoder gets ``--encoder-lr`` times that (0.1 by default, the common discriminative
    fine-tuning rule), so the random decoder's large early gradients do not wash out what
    pretraining learnt.
    """
    enc = [p for m in encoder_modules(net) for p in m.parameters()]
    ids = {id(p) for p in enc}
    rest = [p for p in net.parameters() if id(p) not in ids]
    scale = args.encoder_lr if pretrained else 1.0
    return torch.optim.Adam([{"params": enc, "lr": args.lr * scale}, {"params": rest, "lr": args.lr}])  # fmt: skip


def set_encoder_frozen(net, frozen: bool) -> None:
    """Freeze the encoder (no gradients, BatchNorm statistics kept) or release it."""
    for m in encoder_modules(net):
        for p in m.parameters():
            p.requires_grad_(not frozen)
        m.train(not frozen)


def train_and_test(variant, source, train_vols, test_vols, enc, args, seed):
    torch.manual_seed(seed)
    net = build_segmentation_net(enc, args.n_labels, decoder_channels=DECODER)
    if source is not None:
        report = byol3d.load_into(net, source)
        print(f"  {variant}: {report}", flush=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = make_optimizer(net, source is not None, args)
    # cosine decay to zero: the last steps average out the crop-to-crop noise of the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, args.iterations) / args.iterations)))  # fmt: skip
    warmup = args.warmup if source is not None else 0
    sampler = CropSampler(
        train_vols, args.crop, args.n_labels, args.crop_sampling == "classes", seed
    )
    curve = {}
    for it in range(1, args.iterations + 1):
        net.train()
        set_encoder_frozen(net, it <= warmup)
        x, y = sampler(args.batch)
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        sched.step()
        if seed == 0 and it in args.curve_at and it != args.iterations:  # the curve: seed 0
            curve[it] = float(np.nanmean(test_dice(net, test_vols, enc, args)))
    dice = test_dice(net, test_vols, enc, args)
    curve[args.iterations] = float(np.nanmean(dice))
    return dice, curve


def test_dice(net, test_vols, enc, args) -> np.ndarray:
    """Dice per foreground label, averaged over the test volumes (sliding windows)."""
    net.eval()
    scores = []
    with torch.no_grad():
        for image, label in test_vols:
            logits = sliding_window_inference(image[None], (args.infer_roi,) * enc.spatial_dims, 2, net, overlap=0.25)  # fmt: skip
            scores.append(dice_per_label(logits.argmax(1)[0], label[0], args.n_labels))
    return np.nanmean(np.stack(scores), axis=0)


def paired_table(records: list[dict], labelled, variants) -> str:
    """Pretrained minus scratch per seed (same labelled volumes), mean and 95% t interval."""
    lines = ["| variant - scratch | " + " | ".join(f"{n} labelled" for n in labelled) + " |",
             "|---|" + "---|" * len(labelled)]  # fmt: skip
    for v in variants:
        cells = []
        for n in labelled:
            by_seed = {r["seed"]: r["mean_dice"] for r in records if r["variant"] == v and r["labelled"] == n}  # fmt: skip
            base = {r["seed"]: r["mean_dice"] for r in records if r["variant"] == "scratch" and r["labelled"] == n}  # fmt: skip
            seeds = sorted(set(by_seed) & set(base))
            cells.append(
                paired_difference([by_seed[s] for s in seeds], [base[s] for s in seeds]).format()
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, records: list[dict]) -> None:
    """``results.csv``: one row per training so far (rewritten after each, so a cut-off run keeps them)."""
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)


def write_outputs(out: Path, records: list[dict], labelled, variants) -> str:
    write_results(out, records)
    summary, lines = [], ["| variant | " + " | ".join(f"{n} labelled" for n in labelled) + " |",
                          "|---|" + "---|" * len(labelled)]  # fmt: skip
    for v in variants:
        cells = []
        for n in labelled:
            d = [r["mean_dice"] for r in records if r["variant"] == v and r["labelled"] == n]
            summary.append({"variant": v, "labelled": n, "mean": float(np.mean(d)), "std": float(np.std(d)), "seeds": len(d)})  # fmt: skip
            cells.append(f"{np.mean(d):.3f} +- {np.std(d):.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(summary[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(summary)
    table = "\n".join(lines) + "\n"
    if "scratch" in variants and len(variants) > 1:
        table += "\n" + paired_table(records, labelled, [v for v in variants if v != "scratch"])
    (out / "summary.md").write_text(table)
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, v in enumerate(variants):
        rows = [s for s in summary if s["variant"] == v]
        x = np.array([s["labelled"] for s in rows], dtype=float) * (
            1 + 0.03 * (i - len(variants) / 2)
        )
        ax.errorbar(x, [s["mean"] for s in rows], yerr=[s["std"] for s in rows], marker="o", capsize=3, label=v)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(labelled, [str(n) for n in labelled])
    ax.set_xlabel("labelled training volumes")
    ax.set_ylabel("mean Dice over organs (test set)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_labelled.png", dpi=120)
    return table


def write_curve(out: Path, curves: list[dict], variants) -> None:
    """``curve.csv`` and ``dice_curve.png``: test Dice against fine-tuning iterations."""
    if not curves:
        return
    with open(out / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(curves[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(curves)
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for v in variants:
        for n in sorted({c["labelled"] for c in curves}):
            its = sorted(
                {c["iteration"] for c in curves if c["variant"] == v and c["labelled"] == n}
            )
            mean = [np.mean([c["mean_dice"] for c in curves if c["variant"] == v and c["labelled"] == n and c["iteration"] == it]) for it in its]  # fmt: skip
            ax.plot(its, mean, marker="o", label=f"{v}, {n} labelled")
    ax.set_xlabel("fine-tuning iterations")
    ax.set_ylabel("mean test Dice (mean over seeds)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dice_curve.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="labelled pairs: classes.csv with a segmentation column, images/ + labels/, or imagesTr/ + labelsTr/",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="a pretrained run (repeatable)",
    )
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--labelled", type=int, nargs="+", default=[1, 3, 6])
    p.add_argument(
        "--seeds", type=int, default=5, help="labelled-set draws (the pairs of the comparison)"
    )
    p.add_argument(
        "--test", type=int, default=12, help="held-out test volumes (the last ones by id)"
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=600,
        help="Adam steps per training (see dice_curve.png for the plateau)",
    )
    p.add_argument("--curve-at", type=int, nargs="*", default=None, help="also score the test set at these iterations, for seed 0 (default: 1/4, 1/2 and 3/4 of --iterations)")  # fmt: skip
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=32, help="training crop (a multiple of 32)")
    p.add_argument("--crop-sampling", choices=["classes", "uniform"], default="classes", help="classes: crops centred on a label drawn uniformly, background included (default); uniform: anywhere")  # fmt: skip
    p.add_argument("--infer-roi", type=int, default=96, help="sliding-window size at test time (multiple of 32)")  # fmt: skip
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--encoder-lr", type=float, default=0.1, help="a pretrained encoder's learning rate as a fraction of --lr (scratch: 1)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=0, help="steps with a pretrained encoder frozen (decoder only) before all weights train")  # fmt: skip
    p.add_argument("--n-labels", type=int, default=8, help="label values 0..N-1 (phantoms: 8)")
    p.add_argument("--no-scratch", action="store_true", help="leave out the from-scratch baseline")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 labelled volume, 3 iterations, 2 test volumes")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.labelled, args.iterations, args.test = 1, [1], 3, min(args.test, 2)
    if args.curve_at is None:
        args.curve_at = [args.iterations // 4, args.iterations // 2, 3 * args.iterations // 4]
    args.curve_at = {int(i) for i in args.curve_at if 0 < int(i) <= args.iterations}
    try:
        runs = dict(item.split("=", 1) for item in args.run)
        if not runs or any(not v for v in runs.values()):
            raise DataError("give at least one --run NAME=RUN_DIR (the runs set the backbone and preprocessing)")  # fmt: skip
        encs = {name: byol3d.load_encoder(path) for name, path in runs.items()}
        ref = next(iter(encs.values()))
        for name, enc in encs.items():
            if (enc.name, enc.preprocessing) != (ref.name, ref.preprocessing):
                raise DataError(f"run {name!r} differs from the first run in encoder or preprocessing: {enc.name} {enc.preprocessing}")  # fmt: skip
        if args.crop % 32 or args.infer_roi % 32:
            raise DataError(f"--crop {args.crop} and --infer-roi {args.infer_roi} must be multiples of 32 (FlexibleUNet)")  # fmt: skip
        pairs = segmentation_pairs(args.data)
        if args.test >= len(pairs) or max(args.labelled) > len(pairs) - args.test:
            raise DataError(f"{len(pairs)} labelled volumes cannot hold {args.test} test + {max(args.labelled)} training volumes")  # fmt: skip
    except (Byol3dError, ValueError) as err:
        print(f"finetune_segmentation: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    pre, check = joint_preprocess(ref), ref.preprocess
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def volume(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and label of pair ``i``, preprocessed once, when first needed."""
        if i not in cache:
            d = pre({"image": pairs[i][0], "label": pairs[i][1]})
            if args.crop > min(d["image"].shape[1:]):
                d = SpatialPadd(["image", "label"], spatial_size=[args.crop] * ref.spatial_dims)(d)
            cache[i] = (torch.as_tensor(d["image"].as_tensor()), d["label"].as_tensor().long())
        return cache[i]

    expected = check({"image": pairs[0][0]})["image"]
    got = pre({"image": pairs[0][0], "label": pairs[0][1]})["image"]
    if tuple(expected.shape) != tuple(got.shape) or not torch.allclose(expected.as_tensor(), got.as_tensor(), atol=1e-5):  # fmt: skip
        print("finetune_segmentation: error: the joint preprocessing differs from the run's", file=sys.stderr)  # fmt: skip
        return 2
    n_pool = len(pairs) - args.test
    test = [volume(i) for i in range(n_pool, len(pairs))]
    variants = ([] if args.no_scratch else ["scratch"]) + list(runs)
    args.output.mkdir(parents=True, exist_ok=True)
    records, curves = [], []
    sets = {n: labelled_sets(range(n_pool), n, args.seeds) for n in args.labelled}
    for seed in range(args.seeds):
        for n in args.labelled:
            train_vols = [volume(i) for i in sets[n][seed]]
            for v in variants:
                t0 = time.perf_counter()
                dice, curve = train_and_test(v, runs.get(v), train_vols, test, ref, args, seed)
                curves += [{"variant": v, "labelled": n, "seed": seed, "iteration": it, "mean_dice": d} for it, d in curve.items()]  # fmt: skip
                rec = {
                    "variant": v,
                    "labelled": n,
                    "seed": seed,
                    "mean_dice": float(np.nanmean(dice)),
                }
                rec.update({LABEL_NAMES.get(c + 1, f"label_{c + 1}"): float(d) for c, d in enumerate(dice)})  # fmt: skip
                records.append(rec)
                write_results(args.output, records)
                print(f"seed {seed} n={n} {v}: mean Dice {rec['mean_dice']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    table = write_outputs(args.output, records, args.labelled, variants)
    write_curve(args.output, curves, variants)
    settings = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}  # fmt: skip
    settings["seconds"] = round(time.perf_counter() - start, 1)
    (args.output / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(table, end="")
    print(f"wrote results.csv, summary.csv, summary.md, dice_vs_labelled.png to {args.output} ({settings['seconds']} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
