"""Which files a run trains on: listed, filtered, checked, split into train and validation.

:func:`training_files` lists the images of ``data.root`` or ``data.csv``, drops flat frames
(``data.min_frame_std``), brings the preprocess-once store up to date (``data.cache: store``)
or checks every file (``data.on_bad_file: skip``), lists what it dropped in the run directory,
and splits the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist

from byol3d.data.datasets import check_files, drop_flat_frames
from byol3d.data.discovery import list_images, split_train_val
from byol3d.data.store import source_key
from byol3d.data.store_writer import write_store
from byol3d.errors import DataError
from byol3d.training.distributed import is_main

logger = logging.getLogger("byol3d")


def training_files(
    *,
    root: str | None,
    csv: str | None,
    spatial_dims: int,
    dicom: bool,
    channels: list[str] | None,
    channel_patterns: list[str] | None,
    min_frame_std: float | None,
    on_bad_file: str,
    val_fraction: float,
    seed: int,
    preprocess: Callable,
    num_workers: int,
    out: Path,
    cache: str = "none",
    store_dir: str | None = None,
    progress: bool = False,
) -> tuple[list[str], list[str]]:
    """``(train, val)`` files: listed, checked first with ``on_bad_file="skip"``, split.

    With ``cache="store"`` the store in ``store_dir`` is brought up to date first (rank 0
    writes what is missing or changed in ``num_workers`` processes; the other ranks then
    find it written), and the files it found unusable are the bad ones.
    """
    files = list_images(root, csv=csv, spatial_dims=spatial_dims, dicom=dicom,
                        channels=channels, channel_patterns=channel_patterns)  # fmt: skip
    if min_frame_std is not None and spatial_dims == 2:
        files = _drop_flat_frames(files, min_frame_std, num_workers, out)
    if cache == "store":
        files = _files_in_store(files, preprocess, store_dir, num_workers, on_bad_file, out, progress)  # fmt: skip
    elif on_bad_file == "skip":
        files = _skip_bad_files(files, preprocess, num_workers, out)
    train_files, val_files = split_train_val(files, val_fraction, seed=seed)
    logger.info(
        "data: %d images from %s (%d train, %d validation)",
        len(files),
        csv or root,
        len(train_files),
        len(val_files),
    )
    return train_files, val_files


def _drop_flat_frames(files: list[str], min_std: float, num_workers: int, out: Path) -> list[str]:
    """``data.min_frame_std``: drop constant and near-black frames, count them, list them."""
    kept, dropped = drop_flat_frames(files, min_std, num_workers=num_workers)
    if is_main():
        listing = out / "dropped_frames.txt"
        listing.write_text("".join(f"{path}\t{std:.4f}\n" for path, std in dropped))
        logger.info(
            "data.min_frame_std %g: dropped %d of %d frames (constant, black or near-black; listed in %s)",
            min_std, len(dropped), len(files), listing,
        )  # fmt: skip
    if not kept:
        raise DataError(f"data.min_frame_std {min_std:g} drops all {len(files)} frames (their pixel std is below it)")  # fmt: skip
    return kept


def _files_in_store(files, preprocess, folder, num_workers, on_bad_file, out, progress) -> list[str]:  # fmt: skip
    """``data.cache: store``: write (or update) the store, list its bad files, drop them."""
    with idist.one_rank_first():
        report = write_store(files, preprocess, folder, workers=num_workers,
                             on_bad_file=on_bad_file, progress=progress and is_main())  # fmt: skip
    if report.written:
        logger.info("store %s: %d volumes preprocessed (%d kept) in %.1f s",
                    report.store.folder, report.written, report.kept, report.seconds)  # fmt: skip
    _list_skipped(report.bad, len(files), out)
    bad = {source for source, _ in report.bad}
    return [f for f in files if source_key(f) not in bad]


def _skip_bad_files(files: list[str], preprocess, num_workers: int, out: Path) -> list[str]:
    """``data.on_bad_file: skip``: drop unusable files, warn, list them in skipped_files.txt."""
    good, bad = check_files(files, preprocess, num_workers=num_workers)
    _list_skipped(bad, len(files), out)
    if not good:
        raise DataError(
            f"none of the {len(files)} files under data.root can be used, e.g. {bad[0][1]}"
        )
    return good


def _list_skipped(bad: list[tuple[str, str]], n_files: int, out: Path) -> None:
    """Warn about the skipped files and list them in OUTPUT_DIR/skipped_files.txt (rank 0)."""
    if bad and is_main():
        listing = out / "skipped_files.txt"
        listing.write_text("".join(f"{path}\t{problem}\n" for path, problem in bad))
        logger.warning(
            "skipped %d of %d files that cannot be used (listed in %s), e.g. %s",
            len(bad),
            n_files,
            listing,
            bad[0][1],
        )
