"""The ``byol3d`` command line. It parses arguments and calls the library; nothing more.

    byol3d pretrain CONFIG [KEY=VALUE ...]     pretrain (or resume) as configured
    byol3d demo-data OUT_DIR [--n 16]          write synthetic CT phantoms (NIfTI, HU)
    byol3d demo-data OUT_DIR --kind endoscopy  write synthetic endoscopy frames (PNG) + frames.csv
    byol3d preprocess CONFIG [KEY=VALUE ...]   preprocess every volume once into the store (data.cache: store)
    byol3d stats CONFIG [KEY=VALUE ...]        per-channel mean/std of the data, for transforms.mean/std
    byol3d extract-frames VIDEOS OUT --every N every N-th frame of each video as JPEG (PyAV)
    byol3d preview CONFIG [KEY=VALUE ...]      the two augmented views of a few volumes (PNG)
    byol3d plot RUN_DIR                        training.png and summary.json of a run
    byol3d extract RUN_DIR --data DIR --output OUT     embeddings (features.npy, index.csv)
    byol3d export RUN_DIR --to TARGET --output FILE   weights for FlexibleUNet, a MONAI ResNet,
                                               SwinUNETR, SegResNet or nnU-Net
    byol3d evaluate RUN_DIR --csv LABELS.csv       linear probe and kNN, pretrained vs random
    byol3d evaluate RUN_DIR --segmentation DIR     frozen dense probe (Dice), pretrained vs random

Errors caused by input (config keys, data, checkpoints) print one line,
``byol3d: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from byol3d.cli.parser import build_parser
from byol3d.config import load_config
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.data.synthetic_frames import write_endoscopy_dataset
from byol3d.data.video import extract_video_folder
from byol3d.errors import Byol3dError, DataError
from byol3d.evaluation.dense_probe import dense_probe_run, format_dense_report
from byol3d.evaluation.export import export_encoder
from byol3d.evaluation.features import extract_to_folder
from byol3d.evaluation.probe import evaluate_run, format_report
from byol3d.training.distributed import is_main, launch, wants_distributed
from byol3d.training.pretrain import pretrain
from byol3d.transforms import config_mean_std, preprocess_store
from byol3d.viz.plots import format_summary, plot_training, summarize_run
from byol3d.viz.preview import preview_views

__all__ = ["main"]


@contextlib.contextmanager
def _value_errors_are_input_errors():
    """A ``ValueError`` from the library here comes from a command-line value (``--n 0``,
    ``--workers -1``, ...): report it as the user's input error, in one line."""
    try:
        yield
    except ValueError as err:
        raise Byol3dError(str(err)) from err


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("byol3d")
    for old in [h for h in log.handlers if getattr(h, "_byol3d_cli", False)]:
        log.removeHandler(old)  # a handler of an earlier main() call may hold a closed stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("byol3d: %(message)s"))
    handler._byol3d_cli = True
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # ignite logs every exception that ends a run; byol3d reports it in one line itself
    logging.getLogger("ignite").setLevel(logging.CRITICAL)


def _pretrain(args: argparse.Namespace) -> None:

    cfg = load_config(args.config, args.overrides)
    if not wants_distributed(args.nproc_per_node):
        _report(pretrain(cfg, allow_config_change=args.allow_config_change))
        return
    backend = "gloo" if cfg["train"]["device"] == "cpu" else None
    try:
        launch(
            _rank_pretrain,
            cfg,
            args.allow_config_change,
            args.quiet,
            nproc_per_node=args.nproc_per_node,
            backend=backend,
        )
    except Exception as err:  # a spawned rank exited with the status of its own error line
        if "exit code 2" in str(err) or "exit code 130" in str(err):
            raise SystemExit(2) from None
        raise


def _rank_pretrain(_local_rank: int, cfg: dict, allow_config_change: bool, quiet: bool) -> None:

    _setup_logging(quiet)  # spawned processes start with fresh logging
    try:
        result = pretrain(cfg, allow_config_change=allow_config_change)
    except Byol3dError as err:
        if is_main():
            print(f"byol3d: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    if is_main():
        _report(result)


def _report(result) -> None:
    print(result.summary)


def _preview(args: argparse.Namespace) -> None:

    cfg = load_config(args.config, args.overrides)
    with _value_errors_are_input_errors():
        path = preview_views(cfg, n=args.n, output=args.output, seed=args.seed)
    print(f"byol3d: wrote a preview of the augmented views to {path}")


def _plot(args: argparse.Namespace) -> None:

    path = plot_training(args.run_dir, output=args.output)
    print(format_summary(summarize_run(args.run_dir)))
    print(f"  plot:        {path}")


def _stats(args: argparse.Namespace) -> None:

    cfg = load_config(args.config, args.overrides)
    with _value_errors_are_input_errors():
        mean, std, n = config_mean_std(cfg, max_files=args.max_files)
    listed = lambda values: "[" + ", ".join(f"{v:g}" for v in values) + "]"  # noqa: E731
    print(f"byol3d: per-channel mean/std of {n} preprocessed images ([0, 1] units); in the config:")
    print(f"transforms:\n  mean: {listed(mean)}\n  std: {listed(std)}")
    print(
        f"or as overrides: transforms.mean={listed(mean).replace(' ', '')} "
        f"transforms.std={listed(std).replace(' ', '')}"
    )


def _preprocess(args: argparse.Namespace) -> None:

    cfg = load_config(args.config, args.overrides)
    with _value_errors_are_input_errors():
        report = preprocess_store(cfg, workers=args.workers, hash_sources=args.hash,
                                  progress=not args.quiet)  # fmt: skip
    store = report.store
    print(
        f"byol3d: store {store.folder}: {len(store)} volumes ({report.written} written, "
        f"{report.kept} kept) in {report.seconds:.1f} s, {store.nbytes() / 2**20:.1f} MiB"
    )
    if report.bad:
        print(f"  {len(report.bad)} unusable files skipped (listed in {store.folder / 'manifest.json'})")  # fmt: skip
    if cfg["data"]["cache"] != "store":
        folder = "" if cfg["data"]["cache_dir"] else f" data.cache_dir={store.folder}"
        given = "".join(f" {o}" for o in args.overrides)
        print(
            f"  train from it with: byol3d pretrain {args.config}{given} data.cache=store{folder}"
        )


def _extract_frames(args: argparse.Namespace) -> None:

    with _value_errors_are_input_errors():
        counts = extract_video_folder(
            args.videos, args.output, every=args.every, ext=args.ext, max_frames=args.max_frames
        )
    print(
        f"byol3d: wrote {sum(counts.values())} frames of {len(counts)} video(s) to {args.output} "
        f"(every {args.every}th frame)"
    )


def _demo_data(args: argparse.Namespace) -> None:

    if args.kind == "endoscopy":
        with _value_errors_are_input_errors():
            frames = write_endoscopy_dataset(
                args.output,
                n=args.n,
                videos=args.videos,
                size=tuple(args.frame_size),
                seed=args.seed,
            )
        print(
            f"byol3d: wrote {len(frames)} endoscopy frames to {args.output}/images (frames.csv beside)"
        )
        return

    with _value_errors_are_input_errors():
        paths = write_demo_dataset(
            args.output,
            n=args.n,
            shape=tuple(args.shape),
            spacing=tuple(args.spacing),
            seed=args.seed,
        )
    print(
        f"byol3d: wrote {len(paths)} phantom volumes to {args.output}/images (labels/, classes.csv beside)"
    )


def _extract(args: argparse.Namespace) -> None:

    layers = [x.strip() for x in args.layers.split(",") if x.strip()] if args.layers else None
    feats, index = extract_to_folder(
        args.run_dir,
        args.output,
        data=args.data,
        csv=args.csv,
        root=args.root,
        layers=layers,
        overlap=args.overlap,
        device=args.device,
    )

    shape = np.load(feats, mmap_mode="r").shape
    print(f"byol3d: wrote {shape[0]} x {shape[1]} features to {feats} (rows: {index})")


def _export(args: argparse.Namespace) -> None:
    report = export_encoder(args.run_dir, args.output, to=args.to, backbone=args.backbone,
                            plans=args.plans, configuration=args.configuration)  # fmt: skip
    print(f"byol3d: {report}")
    print(f"  wrote {args.output} (load code and preprocessing in {args.output}.json)")


def _evaluate(args: argparse.Namespace) -> None:
    if args.csv is None and args.segmentation is None:
        raise DataError("give --csv LABELS.csv (linear probe, kNN) and/or --segmentation DIR (dense probe)")  # fmt: skip
    if args.csv is not None:
        report = evaluate_run(
            args.run_dir,
            args.csv,
            root=args.root,
            output=args.output,
            folds=args.folds,
            seeds=args.seeds or 3,
            k=args.k,
        )
        print(format_report(report), end="")
        print(f"byol3d: report in {report['output']}")
    if args.segmentation is not None:
        report = dense_probe_run(
            args.run_dir,
            args.segmentation,
            output=None if args.output is None else Path(args.output) / "dense_probe",
            labelled=args.labelled,
            seeds=args.seeds or 5,
            random_inits=args.random_inits,
            test=args.test,
            voxels_per_class=args.voxels_per_class,
        )
        print(format_dense_report(report), end="")
        print(f"byol3d: dense probe report in {report['output']}")


def _one_line(err: Exception) -> str:
    """The message of ``err``; for one re-raised from a DataLoader worker (which carries the
    worker's traceback), the original message from its last line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    last = lines[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``byol3d`` console script; returns the exit status."""
    parser = build_parser()
    # options may come between the KEY=VALUE overrides: collect the overrides argparse left over
    args, extra = parser.parse_known_args(argv)
    unknown = [
        x
        for x in extra
        if x.startswith("-") or args.command not in ("pretrain", "preview", "stats", "preprocess")
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(getattr(args, "quiet", False))
    try:
        commands = {
            "pretrain": _pretrain,
            "demo-data": _demo_data,
            "preview": _preview,
            "plot": _plot,
            "stats": _stats,
            "preprocess": _preprocess,
            "extract-frames": _extract_frames,
            "extract": _extract,
            "export": _export,
            "evaluate": _evaluate,
        }
        commands[args.command](args)
    except Byol3dError as err:
        print(f"byol3d: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("byol3d: interrupted; the checkpoints written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
