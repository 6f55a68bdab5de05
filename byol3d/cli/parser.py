"""The ``byol3d`` command line's arguments: one ``argparse`` sub-parser per command.

:func:`build_parser` is all :func:`byol3d.cli.main` needs from here; the commands' help texts
are what ``byol3d COMMAND --help`` prints.
"""

from __future__ import annotations

import argparse

from byol3d.evaluation.export import EXPORT_TARGETS

__all__ = ["build_parser"]


def _config_arguments(
    parser: argparse.ArgumentParser, config_help: str, overrides_help: str
) -> None:
    """The ``CONFIG [KEY=VALUE ...]`` arguments of the commands that read a config."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``byol3d`` command."""
    parser = argparse.ArgumentParser(
        prog="byol3d", description="BYOL self-supervised pretraining for MONAI ResNet encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_commands(sub)
    _add_data_commands(sub)
    _add_downstream_commands(sub)
    _add_evaluate_command(sub)
    return parser


def _add_run_commands(sub) -> None:
    """pretrain and demo-data."""
    p = sub.add_parser(
        "pretrain", help="pretrain an encoder with BYOL (resumes from OUTPUT_DIR/checkpoints)"
    )
    _config_arguments(p, "YAML config, e.g. configs/ct_resnet50.yaml",
                      "dotted overrides parsed as YAML, e.g. train.max_epochs=5")  # fmt: skip
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run in OUTPUT_DIR even if its config differs",
    )
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="spawn N processes on this machine (DDP through ignite.distributed; gloo on CPU)",
    )

    d = sub.add_parser(
        "demo-data", help="write synthetic CT phantoms with organ labels and class labels"
    )
    d.add_argument("output", help="folder to write images/, labels/ and classes.csv into")
    d.add_argument("--n", type=int, default=16, help="number of volumes (default 16)")
    d.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(96, 96, 64),
        metavar=("I", "J", "K"),
        help="voxels (default 96 96 64)",
    )
    d.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(4.0, 4.0, 5.0),
        metavar=("SI", "SJ", "SK"),
        help="mm (default 4 4 5)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--kind",
        choices=("ct", "endoscopy"),
        default="ct",
        help="ct: NIfTI phantoms (default); endoscopy: PNG frames in video folders + frames.csv",
    )
    d.add_argument("--videos", type=int, default=4, help="endoscopy: video folders (default 4)")
    d.add_argument(
        "--frame-size",
        type=int,
        nargs=2,
        default=(128, 112),
        metavar=("W", "H"),
        help="endoscopy: frame width and height in pixels (default 128 112)",
    )


def _add_data_commands(sub) -> None:
    """extract-frames, stats, preview, plot."""
    x = sub.add_parser(
        "extract-frames",
        help="write every N-th frame of videos as images (needs PyAV: pip install av)",
    )
    x.add_argument("videos", help="a video file or a folder searched recursively for videos")
    x.add_argument("output", help="folder; one sub-folder of frames per video")
    x.add_argument("--every", type=int, default=25, help="keep one frame in N (default 25)")
    x.add_argument(
        "--ext", choices=("jpg", "png"), default="jpg", help="image format (default jpg)"
    )
    x.add_argument("--max-frames", type=int, default=None, help="at most this many per video")
    pre = sub.add_parser(
        "preprocess",
        help="preprocess every image once into the store that data.cache=store trains from",
    )
    _config_arguments(pre, "YAML config, as for pretrain", "dotted overrides")
    pre.add_argument("--workers", type=int, default=None, help="processes (default data.num_workers)")  # fmt: skip
    pre.add_argument("--hash", action="store_true", help="also record and check each source's SHA-256")  # fmt: skip
    pre.add_argument("--quiet", action="store_true", help="only warnings and errors")
    st = sub.add_parser(
        "stats", help="per-channel mean/std of the configured data (for transforms.mean/std)"
    )
    _config_arguments(st, "YAML config, as for pretrain", "dotted overrides")
    st.add_argument(
        "--max-files", type=int, default=1000, help="evenly spaced files read (default 1000)"
    )
    v = sub.add_parser("preview", help="draw the two augmented views of a few volumes (PNG)")
    _config_arguments(v, "YAML config, as for pretrain", "dotted overrides")
    v.add_argument("--n", type=int, default=4, help="number of volumes (default 4)")
    v.add_argument("--output", default="views.png", help="PNG path (default views.png)")
    v.add_argument("--seed", type=int, default=0, help="random state of the augmentations")

    pl = sub.add_parser("plot", help="training.png and summary.json of a run (also while it runs)")
    pl.add_argument("run_dir", help="the run's output_dir")
    pl.add_argument("--output", default=None, help="PNG path (default RUN_DIR/training.png)")


def _add_downstream_commands(sub) -> None:
    """extract and export."""
    ex = sub.add_parser("extract", help="embeddings of every image (features.npy + index.csv)")
    ex.add_argument("run_dir", help="run directory, encoder.pt or checkpoint")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder searched recursively for images")
    src.add_argument("--csv", help="CSV list with a path (or id) column, optional label")
    ex.add_argument("--root", default=None, help="folder relative CSV paths start from")
    ex.add_argument("--output", required=True, help="folder for features.npy and index.csv")
    ex.add_argument(
        "--layers", default=None, help="also write feature maps, e.g. layer1,layer2,layer3,layer4"
    )
    ex.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    ex.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")

    xp = sub.add_parser("export", help="encoder weights that load into the network you fine-tune")
    xp.add_argument("run_dir", help="run directory, encoder.pt or checkpoint")
    xp.add_argument("--to", required=True, choices=EXPORT_TARGETS)
    xp.add_argument(
        "--backbone", default=None, help="resnet targets: architecture expected, e.g. resnet50"
    )
    xp.add_argument(
        "--plans", default=None, help="nnunet: plans JSON of the network (default: the run's)"
    )
    xp.add_argument(
        "--configuration", default=None, help="nnunet: plans configuration (default: the run's)"
    )
    xp.add_argument("--output", required=True, help="the file to write")


def _add_evaluate_command(sub) -> None:
    """evaluate: the global probe (--csv) and the dense probe (--segmentation)."""
    ev = sub.add_parser(
        "evaluate",
        help="pretrained vs random init: linear probe and kNN (--csv), frozen dense probe (--segmentation)",
    )
    ev.add_argument("run_dir", help="run directory, encoder.pt or checkpoint")
    ev.add_argument("--csv", default=None, help="CSV with label and path (or id) columns")
    ev.add_argument(
        "--segmentation",
        default=None,
        help="labelled volumes for the frozen dense probe: a CSV with path and segmentation "
        "columns, or a folder with images/ + labels/ (or imagesTr/ + labelsTr/)",
    )
    ev.add_argument("--labelled", type=int, nargs="+", default=[1, 3, 6], help="dense probe: labelled training volumes (default 1 3 6)")  # fmt: skip
    ev.add_argument("--test", type=int, default=None, help="dense probe: held-out volumes (default a quarter)")  # fmt: skip
    ev.add_argument("--random-inits", type=int, default=3, help="dense probe: random initialisations (default 3)")  # fmt: skip
    ev.add_argument("--voxels-per-class", type=int, default=2000, help="dense probe: voxel samples per label and volume")  # fmt: skip
    ev.add_argument("--root", default=None, help="folder relative CSV paths start from")
    ev.add_argument("--output", default=None, help="report folder (default RUN_DIR/evaluation)")
    ev.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    ev.add_argument("--seeds", type=int, default=None, help="split seeds (default 3 for --csv, 5 labelled-set draws for --segmentation)")  # fmt: skip
    ev.add_argument("--k", type=int, default=5, help="kNN neighbours (default 5)")
