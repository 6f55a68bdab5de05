"""Does pretraining pay? One command: pretrain, then compare against random init, paired.

    make study                                   # the default study (about 90 minutes on 2 CPU cores)
    python scripts/transfer_study.py --output runs/study --doc docs/evaluation.md
    python scripts/transfer_study.py --output runs/study_quick --quick     # a smoke test (minutes)

Steps (each resumable: a rerun skips what is done):

1. Data: ``--pool`` unlabelled phantoms for pretraining (``byol3d demo-data``, dataset seed 1)
   and ``--eval`` labelled phantoms (dataset seed 2: other subjects) for evaluation only.
   With ``--pool-dir`` / ``--eval-dir`` any folders are used instead (real CT, say): the
   pool is read like ``data.root``, the evaluation set as in ``byol3d evaluate --segmentation``
   (and its ``classes.csv`` with a ``label`` column, if present, for the global probe).
2. Two pretraining runs of ``--config`` on the pool: ``global`` (BYOL) and ``global+dense``
   (``model.dense_weight=1``), ``--epochs`` epochs each, plus any ``--set KEY=VALUE``.
3. Frozen dense probe (:mod:`byol3d.evaluation.dense_probe`) of both runs (and of any
   ``--compare NAME=RUN_DIR``) and of ``--random-inits`` random inits at ``--labelled``
   labelled volumes, ``--seeds`` draws.
4. FlexibleUNet fine-tuning (``scripts/finetune_segmentation.py``, its recipe: a pretrained
   encoder at 0.1x the learning rate, cosine decay): scratch and global (and global+dense
   with ``--ft-dense``) at the same labelled counts and labelled sets, ``--ft-iterations``
   steps.
5. Global linear probe and kNN (``byol3d evaluate --csv``) when the evaluation set has class
   labels.
6. ``OUTPUT/study.md`` (every table, with the commands) and ``OUTPUT/study.png``; with
   ``--doc FILE`` the same text replaces the part of FILE between ``<!-- study:start -->`` and
   ``<!-- study:end -->`` (appended when the markers are missing).

Progress bars (tqdm) show each step; every step logs its wall time and an estimate of the
time left, from the measured speed of the step before.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

import finetune_segmentation  # scripts/ is on sys.path when this file runs as a script
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from byol3d.config import load_config
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.evaluation.dense_probe import dense_probe_run, format_dense_report
from byol3d.evaluation.probe import evaluate_run, format_report
from byol3d.rundir import latest_checkpoint
from byol3d.training.pretrain import pretrain

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- study:start -->", "<!-- study:end -->"


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _data(args) -> tuple[Path, Path]:
    pool = args.pool_dir or args.output / "pool"
    evald = args.eval_dir or args.output / "eval"
    if args.pool_dir is None and not (pool / "classes.csv").exists():
        _log(f"writing {args.pool} pretraining phantoms to {pool}")
        write_demo_dataset(pool, n=args.pool, seed=1)
    if args.eval_dir is None and not (evald / "classes.csv").exists():
        _log(f"writing {args.eval} evaluation phantoms to {evald}")
        write_demo_dataset(evald, n=args.eval, seed=2)
    images = pool / "images" if (pool / "images").is_dir() else pool
    return images, evald


def _pretrain(args, images: Path, name: str, extra: list[str]) -> Path:
    out = args.output / f"run_{name.replace('+', '_')}"
    overrides = [f"data.root={images}", f"output_dir={out}", f"train.max_epochs={args.epochs}",
                 "train.progress=true", *extra, *args.set]  # fmt: skip
    cfg = load_config(args.config, overrides)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and (out / "encoder.pt").exists() and _epoch(ckpt) >= args.epochs:
        _log(f"{name}: already pretrained ({out})")
        return out
    t0 = time.perf_counter()
    _log(f"{name}: pretraining {args.config} for {args.epochs} epochs -> {out}")
    pretrain(cfg)
    _log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return out


def _epoch(ckpt: Path) -> int:
    return int(ckpt.stem.split("_")[-1])


def run(args) -> str:
    args.output.mkdir(parents=True, exist_ok=True)
    commands = [" ".join(["python", "scripts/transfer_study.py", *map(shlex.quote, args.argv)])]
    t_start = time.perf_counter()
    images, evald = _data(args)
    runs = {"global": _pretrain(args, images, "global", [])}
    runs["global+dense"] = _pretrain(args, images, "global+dense", ["model.dense_weight=1.0"])
    t_pre = time.perf_counter()
    _log(f"pretraining done in {t_pre - t_start:.0f} s; dense probe next")

    dense = dense_probe_run(
        runs["global"], evald, output=args.output / "dense_probe", labelled=args.labelled,
        seeds=args.seeds, random_inits=args.random_inits, test=args.test, name="global",
        others={"global+dense": runs["global+dense"], **dict(c.split("=", 1) for c in args.compare)},
    )  # fmt: skip
    t_probe = time.perf_counter()
    n_ft = len(args.labelled) * (args.ft_seeds or args.seeds) * (3 if args.ft_dense else 2)
    _log(f"dense probe done in {t_probe - t_pre:.0f} s; fine-tuning next: {n_ft} trainings of "
         f"{args.ft_iterations} iterations")  # fmt: skip

    ft_dir = args.output / "finetune"
    ft_args = ["--data", str(evald), "--output", str(ft_dir), "--run", f"global={runs['global']}",
               *(["--run", f"global+dense={runs['global+dense']}"] if args.ft_dense else []),
               "--labelled", *map(str, args.labelled),
               "--seeds", str(args.ft_seeds or args.seeds), "--test", str(args.test),
               "--iterations", str(args.ft_iterations)]  # fmt: skip
    if not (ft_dir / "summary.md").exists():
        if finetune_segmentation.main(ft_args) != 0:
            raise SystemExit("fine-tuning failed")
    ft_table = (ft_dir / "summary.md").read_text() + _curve_table(ft_dir / "curve.csv")
    t_ft = time.perf_counter()

    global_table = ""
    classes = evald / "classes.csv"
    if classes.exists() and "label" in classes.read_text().splitlines()[0].split(","):
        for name, path in runs.items():
            rep = evaluate_run(path, classes, output=args.output / f"global_probe_{name.replace('+', '_')}",
                               seeds=args.seeds, progress=True)  # fmt: skip
            global_table += f"\n**{name}**\n\n" + format_report(rep)
    t_end = time.perf_counter()
    times = {"pretraining": t_pre - t_start, "dense probe": t_probe - t_pre,
             "fine-tuning": t_ft - t_probe, "global probe": t_end - t_ft}  # fmt: skip
    _plot(args.output / "study.png", dense, ft_dir)
    text = _markdown(args, commands, ft_args, dense, ft_table, global_table, times)
    (args.output / "study.md").write_text(text)
    (args.output / "study.json").write_text(json.dumps({"times": times, "dense": dense["summary"]}, indent=2))  # fmt: skip
    if args.doc:
        _write_doc(args.doc, text)
    return text


def _markdown(args, commands, ft_args, dense, ft_table, global_table, times) -> str:
    minutes = ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
    return "\n".join([
        START,
        "### The last run of the study",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"Pretraining: `{_shown(args.config)}`, {args.epochs} epochs on "
        f"{'the ' + str(args.pool) + ' pool phantoms' if args.pool_dir is None else args.pool_dir}"
        f"{' with ' + ' '.join(args.set) if args.set else ''}; evaluation on "
        f"{'the ' + str(args.eval) + ' evaluation phantoms (other subjects)' if args.eval_dir is None else args.eval_dir}"
        f", {args.test} of them held out for testing. Wall time: {minutes}.",
        "",
        "#### Frozen dense probe (mean organ Dice; difference to the mean of the random inits, "
        "paired by labelled set, 95% t interval)",
        "",
        format_dense_report(dense),
        "#### FlexibleUNet fine-tuning (mean organ Dice, mean +- std over seeds; paired "
        "difference to scratch with 95% t interval)",
        "",
        f"`python scripts/finetune_segmentation.py {' '.join(map(shlex.quote, ft_args))}`",
        "",
        ft_table,
        *(["#### Global linear probe and kNN (class labels of the evaluation set)", global_table]
          if global_table else []),  # fmt: skip
        "![study](study.png)" if args.doc is None else "",
        END,
        "",
    ])  # fmt: skip


def _shown(path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _curve_table(path: Path) -> str:
    """Test Dice along fine-tuning (seed 0, ``curve.csv``): does it reach its plateau?"""
    if not path.exists():
        return ""
    rows = [
        r for r in csv.DictReader(open(path)) if r["seed"] == "0"
    ]  # the last point has every seed
    its = sorted({int(r["iteration"]) for r in rows})
    lines = ["", "Test Dice along fine-tuning (seed 0):", "",
             "| variant | labelled | " + " | ".join(f"{i} it." for i in its) + " |",
             "|---|---|" + "---|" * len(its)]  # fmt: skip
    for key in dict.fromkeys((r["variant"], r["labelled"]) for r in rows):
        got = {int(r["iteration"]): float(r["mean_dice"]) for r in rows if (r["variant"], r["labelled"]) == key}  # fmt: skip
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{got[i]:.3f}" if i in got else "" for i in its) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _write_doc(doc: Path, text: str) -> None:
    old = doc.read_text() if doc.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    doc.write_text(new)
    _log(f"wrote the study section of {doc}")


def _plot(path: Path, dense, ft_dir: Path) -> None:
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labelled = dense["labelled"]
    for name, by_n in dense["summary"].items():
        ax1.plot(labelled, [by_n[str(n)]["mean_a"] for n in labelled], marker="o", label=name)
    first = next(iter(dense["summary"].values()))
    ax1.plot(labelled, [first[str(n)]["mean_b"] for n in labelled], marker="s", ls="--", label="random init")  # fmt: skip
    ax1.set_title("frozen dense probe")
    rows = [r.split(",") for r in (ft_dir / "summary.csv").read_text().splitlines()[1:]]
    for v in dict.fromkeys(r[0] for r in rows):
        pts = [(int(r[1]), float(r[2]), float(r[3])) for r in rows if r[0] == v]
        ax2.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=v)  # fmt: skip
    ax2.set_title("FlexibleUNet fine-tuning")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(labelled, [str(n) for n in labelled])
        ax.set_xlabel("labelled training volumes")
        ax.set_ylabel("mean organ Dice (test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/study"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_ct.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both runs")  # fmt: skip
    p.add_argument("--pool", type=int, default=200, help="pretraining phantoms (default 200)")
    p.add_argument("--eval", type=int, default=24, help="labelled evaluation phantoms (default 24)")  # fmt: skip
    p.add_argument("--compare", action="append", default=[], metavar="NAME=RUN_DIR", help="also probe this run (same architecture and preprocessing; repeatable), e.g. a shorter pretraining")  # fmt: skip
    p.add_argument("--pool-dir", type=Path, default=None, help="pretrain on this folder instead")
    p.add_argument("--eval-dir", type=Path, default=None, help="evaluate on this folder instead")
    p.add_argument(
        "--epochs", type=int, default=24, help="pretraining epochs per run (default 24: 1032 steps)"
    )
    p.add_argument("--labelled", type=int, nargs="+", default=[1, 3, 6])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--random-inits", type=int, default=3)
    p.add_argument("--test", type=int, default=6, help="held-out evaluation volumes")
    p.add_argument("--ft-iterations", type=int, default=600, help="fine-tuning steps (dice_curve.png shows the plateau)")  # fmt: skip
    p.add_argument("--ft-dense", action="store_true", help="also fine-tune the global+dense run (a third of the fine-tuning time more)")  # fmt: skip
    p.add_argument("--ft-seeds", type=int, default=None, help="fine-tuning seeds (default --seeds)")
    p.add_argument("--doc", type=Path, default=None, help="also write the study section into this markdown file")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: 12+10 phantoms, 1 epoch, 2 seeds, 5 fine-tuning steps")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.pool, args.eval, args.epochs, args.seeds, args.random_inits = 12, 10, 1, 2, 1
        args.labelled, args.test, args.ft_iterations = [1, 3], 4, 5
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
