"""Which files a run reads: folder searches and CSV lists of images, and the train/val split.

- :func:`find_images`: 3D volumes (NIfTI, NRRD, MetaImage) and DICOM series folders under
  a folder; :func:`find_frames`: 2D frames (PNG, JPEG, BMP, TIFF), e.g. one sub-folder per
  video; both skip hidden files and say what they found instead when they find nothing.
- :func:`read_image_list`: the one reader of CSV lists (``data.csv``, ``train.knn_csv``,
  ``byol3d evaluate/extract --csv``), with one path rule (see its docstring).
- :func:`list_images`: what ``byol3d pretrain`` trains on (a CSV list, else a search);
  :func:`split_train_val`: the seeded validation split.

>>> from byol3d.data.discovery import find_frames, list_images, read_image_list
>>> find_frames("/data/frames")[:2]                                      # doctest: +SKIP
['/data/frames/video01/000000.png', '/data/frames/video01/000025.png']
>>> read_image_list("/data/train.csv", root="/data")[0]                  # doctest: +SKIP
{'image': '/data/images/0001.png', 'id': '0001', 'label': '3'}
>>> list_images(root="/data", csv="/data/train.csv", spatial_dims=2)[:1]  # doctest: +SKIP
['/data/images/0001.png']

Labels are carried along for evaluation tools and are never needed to pretrain.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from monai.config import PathLike

from byol3d.checks import check_number
from byol3d.data.channels import find_subjects
from byol3d.data.dicom import scan_folder
from byol3d.data.frame_reader import FRAME_SUFFIXES
from byol3d.errors import DataError

logger = logging.getLogger("byol3d")


#: Image files :func:`find_images` collects (matched case-insensitively).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _maybe_dicom(name: str) -> bool:
    """No suffix, a numeric one (UID-named files such as ``1.2.840.113619.2.1``) or ``.ima``."""
    suffix = Path(name).suffix.lower()
    return suffix in ("", ".ima", ".dicom") or suffix[1:].isdigit()


def _is_dicom_folder(folder: str, names: Sequence[str]) -> bool:
    """A folder with ``.dcm`` files, or with files that GDCM reads as a DICOM series."""
    if any(n.lower().endswith(".dcm") for n in names):
        return True
    if any(_maybe_dicom(n) for n in names):  # GDCM reads only the headers, once (cached)
        try:
            return bool(scan_folder(folder))
        except DataError:
            return False
    return False


def walk_visible(root: PathLike) -> Iterator[tuple[str, list[str]]]:
    """``(folder, sorted file names)`` for every folder under ``root``, in sorted order,
    skipping hidden files and folders (``.name``).

    Raises:
        DataError: when ``root`` does not exist or is not a folder.
    """
    folder = Path(root).expanduser()
    if not folder.exists():
        raise DataError(f"data folder {root} does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder {root} is not a directory")
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, sorted(f for f in filenames if not f.startswith("."))


def find_images(root: PathLike, dicom: bool = True) -> list[str]:
    """All images under ``root``, recursively, as a sorted list of paths.

    Collects files ending in :data:`IMAGE_SUFFIXES` (any case) and, with ``dicom``, DICOM
    series folders (a folder holding ``.dcm`` files, or files without a suffix, with a
    numeric one as UID-named files have, or ``.ima``, that SimpleITK/GDCM recognises as
    DICOM); the folder path stands for the series. Hidden
    files and folders (``.name``) are skipped, as are ``.raw`` companions of ``.mhd``.

    Args:
        root: the data folder.
        dicom: also look for DICOM series folders.

    Returns:
        Sorted paths (strings), the same on every call and machine for the same tree.

    Raises:
        DataError: when ``root`` does not exist, is not a folder, or holds no image.
    """
    found: list[str] = []
    others: Counter[str] = Counter()
    for dirpath, names in walk_visible(root):
        found += [os.path.join(dirpath, f) for f in names if is_image(f)]
        rest = [f for f in names if not is_image(f)]
        if dicom and rest and _is_dicom_folder(dirpath, rest):
            found.append(dirpath)
        else:
            others.update(Path(f).suffix.lower() or "(no suffix)" for f in rest)
    if not found:
        looked = "/".join(IMAGE_SUFFIXES) + (
            " files or DICOM series folders" if dicom else " files"
        )
        held = sum(others.values())
        if held:
            kinds = ", ".join(f"{n} {s}" for s, n in others.most_common(5))
            raise DataError(
                f"no images in {root}: found {held} files ({kinds}), none of them {looked}"
            )
        raise DataError(
            f"no images in {root}: it holds no files (looked for {looked}, recursively)"
        )
    return sorted(found)


def split_train_val(
    files: Sequence[PathLike], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split files into training and validation sets with a seeded shuffle.

    The split depends only on the set of files and the seed (the files are sorted before
    shuffling), so it is the same on every call. Both lists keep the sorted order.

    Args:
        files: image paths, e.g. from :func:`find_images` (or lists of channel paths, one
            per subject; sorted and compared by their text).
        val_fraction: fraction for validation in [0, 1). 0 gives no validation; otherwise
            at least one validation file when there are two or more files, and never all.
        seed: the shuffle's seed.

    Returns:
        ``(train, val)``, disjoint lists of strings.
    """
    check_number("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
    items = sorted((f if isinstance(f, (list, tuple)) else str(f) for f in files), key=str)
    names = [str(f) for f in items]
    if len(set(names)) != len(names):
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"files holds duplicates, e.g. {dupes[0]!r}")
    n_val = 0
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(1, round(len(names) * val_fraction)), len(names) - 1)
    elif val_fraction > 0:
        logger.warning("only %d image(s): no validation split", len(names))
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [n for i, n in enumerate(items) if i not in val_idx]
    val = [n for i, n in enumerate(items) if i in val_idx]
    return train, val


#: Video files: not read directly; ``byol3d extract-frames`` turns them into frames first.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg", ".webm")


#: Suffixes tried, in order, for a CSV row that gives an ``id`` without a ``path``.
_ID_SUFFIXES = (*FRAME_SUFFIXES, ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_frames(root: PathLike) -> list[str]:
    """All frames under ``root``, recursively, as a sorted list of paths.

    Collects files ending in :data:`FRAME_SUFFIXES` (any case), e.g. ``root/video01/0001.png``;
    hidden files and folders (``.name``) are skipped.

    Raises:
        DataError: when ``root`` does not exist, is not a folder, or holds no frame (the
            message counts the files it did find by suffix, and points videos to
            ``byol3d extract-frames``).
    """
    found: list[str] = []
    others: Counter[str] = Counter()
    for dirpath, names in walk_visible(root):
        for name in names:
            if name.lower().endswith(FRAME_SUFFIXES):
                found.append(os.path.join(dirpath, name))
            else:
                others[Path(name).suffix.lower() or "(no suffix)"] += 1
    if found:
        return found
    looked = "/".join(FRAME_SUFFIXES)
    if not others:
        raise DataError(
            f"no frames in {root}: it holds no files (looked for {looked}, recursively)"
        )
    kinds = ", ".join(f"{n} {s}" for s, n in others.most_common(5))
    hint = ""
    if any(s in VIDEO_SUFFIXES for s in others):
        hint = "; extract frames from videos first: byol3d extract-frames VIDEO_DIR FRAME_DIR --every N"
    raise DataError(
        f"no frames in {root}: found {sum(others.values())} files ({kinds}), none of them {looked}{hint}"
    )


def read_image_list(
    csv_path: PathLike,
    root: PathLike | None = None,
    require_label: bool = False,
    channels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The rows of a CSV list of images, each as ``{"image": path, "id": ..., "label": ...}``.

    The one reader of image lists (``data.csv``, ``train.knn_csv``, ``byol3d evaluate
    --csv``, ``byol3d extract --csv``), with one path rule:

    - a ``path`` cell is a file (or a DICOM series folder), absolute or relative to ``root``;
    - an ``id`` cell names the first that exists of ``root/images/ID.EXT`` and
      ``root/ID.EXT`` for EXT in .png, .jpg, .jpeg, .bmp, .tif, .tiff, .nii.gz, .nii, .nrrd,
      .mha, .mhd, then ``root/images/ID`` and ``root/ID`` (a DICOM series folder, or an id
      that already carries its suffix);
    - ``root`` defaults to the CSV's folder.

    At least one of the two columns is needed; ``label`` is optional and passed on as the
    string it is (empty cells are left out) unless ``require_label``. Other columns are
    ignored. With ``channels`` (multi-sequence subjects, ``data.channels``) each row instead
    needs one column per channel name, each cell a path by the same rule, and ``"image"``
    is the list of those paths in channel order (``id``: the ``id`` cell or the first
    file's stem).

    Args:
        csv_path: the CSV file (comma-separated, with a header row).
        root: the folder that relative paths and ids are resolved against.
        require_label: every row needs a non-empty ``label``, and there must be two classes
            at least (what a probe needs).

    Returns:
        One dict per row, in file order; ``"id"`` is the ``id`` cell, or the file name
        without its image suffix.

    Raises:
        DataError: an unreadable CSV, no ``path``/``id`` column, an empty cell, a file that
            does not exist (named with its CSV line), the same file listed twice, or (with
            ``require_label``) a missing label column, an empty label or a single class.
    """
    csv_file = Path(csv_path).expanduser()
    base = Path(root).expanduser() if root else csv_file.parent
    columns, rows = _read_csv(csv_file)
    where = f"CSV list {csv_path}"
    missing = [c for c in channels or () if c not in columns]
    if missing:
        raise DataError(f"{where} needs a column per channel of data.channels {list(channels)}, missing {missing} (found columns {columns})")  # fmt: skip
    if not channels and "path" not in columns and "id" not in columns:
        raise DataError(f"{where} needs a 'path' or an 'id' column, found columns {columns}")
    if require_label and "label" not in columns:
        raise DataError(f"{where} needs a 'label' column, found columns {columns}")
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        item = (_channel_item if channels else _row_item)(
            row, base, f"{where} line {line}", channels
        )
        if require_label and "label" not in item:
            raise DataError(f"{where} line {line}: empty label")
        key = str(item["image"])
        if key in seen:
            raise DataError(
                f"{where} line {line}: {item['image']} is already listed on line {seen[key]}"
            )
        seen[key] = line
        out.append(item)
    if not out:
        raise DataError(f"{where} lists no images (only a header)")
    classes = {item.get("label") for item in out}
    if require_label and len(classes) < 2:
        raise DataError(f"{where}: at least two classes are needed, found {len(classes)}")
    return out


def _read_csv(csv_file: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The stripped header and rows of a CSV file (a BOM is dropped)."""
    try:
        with csv_file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [
                {(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV list {csv_file}: {err}") from err
    return columns, rows


def _channel_item(row: dict[str, str], base: Path, where: str, channels: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """One multi-sequence row: ``{"image": [path per channel], "id", "label"?}``."""
    paths = []
    for name in channels:
        if not row.get(name):
            raise DataError(f"{where}: empty {name!r} (a file for every channel of data.channels)")  # fmt: skip
        path = base / Path(row[name]).expanduser()
        if not path.exists():
            raise DataError(f"{where}: {name} image {path} does not exist")
        paths.append(os.path.normpath(str(path)))
    item: dict[str, Any] = {"image": paths, "id": row.get("id") or _stem(Path(paths[0]))}
    if row.get("label"):
        item["label"] = row["label"]
    return item


def _row_item(row: dict[str, str], base: Path, where: str, _channels: Any = None) -> dict[str, Any]:  # fmt: skip
    """One row as ``{"image", "id", "label"?}`` by :func:`read_image_list`'s path rule."""
    if row.get("path"):
        path = base / Path(row["path"]).expanduser()  # an absolute path replaces base
        if not path.exists():
            raise DataError(f"{where}: image {path} does not exist")
    elif row.get("id"):
        name = row["id"]
        candidates = [
            base / sub / f"{name}{ext}" for ext in _ID_SUFFIXES for sub in ("images", ".")
        ]
        candidates += [base / "images" / name, base / name]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise DataError(
                f"{where}: no image for id {name!r} ({base / 'images' / name}.png, "
                f"{base / name}.png or another of {', '.join(_ID_SUFFIXES)})"
            )
    else:
        raise DataError(f"{where}: empty 'path' and 'id'")
    item: dict[str, Any] = {
        "image": os.path.normpath(str(path)),
        "id": row.get("id") or _stem(path),
    }
    if row.get("label"):
        item["label"] = row["label"]
    return item


def _stem(path: Path) -> str:
    """The file name without its image suffix (``ct_001.nii.gz`` -> ``ct_001``)."""
    name = path.name
    for suffix in sorted(_ID_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_images(
    root: PathLike | None = None,
    csv: PathLike | None = None,
    spatial_dims: int = 3,
    dicom: bool = True,
    channels: Sequence[str] | None = None,
    channel_patterns: Sequence[str] | None = None,
) -> list[str] | list[list[str]]:
    """The image paths a run trains on: a CSV list if given, else a folder search.

    - ``csv`` set: the rows of :func:`read_image_list` (2D or 3D files alike);
    - otherwise, for ``spatial_dims`` 2, :func:`find_frames` under ``root``; for 3, the
      volumes and DICOM series of :func:`byol3d.data.discovery.find_images`;
    - with ``channels`` (multi-sequence subjects), one list of paths per subject instead:
      the CSV's channel columns, or :func:`byol3d.data.channels.find_subjects` under ``root``.

    Raises:
        DataError: as the functions above, or when neither ``root`` nor ``csv`` is given.
    """
    if csv:
        return [item["image"] for item in read_image_list(csv, root, channels=channels)]
    if not root:
        raise DataError(
            "data.root is not set: give the data folder (e.g. data.root=/data/frames) or a "
            "CSV list (data.csv=/data/train.csv)"
        )
    if channels:
        return find_subjects(walk_visible(root), channels, channel_patterns)
    if spatial_dims == 2:
        return find_frames(root)
    return find_images(root, dicom=dicom)


def segmentation_pairs(source: str | Path) -> list[tuple[str, str]]:
    """``(image, label map)`` paths of a labelled data set, sorted by image path.

    Args:
        source: a CSV (columns ``path`` or ``image``, and ``segmentation`` or ``label_map``;
            relative paths against the CSV's folder), a folder holding such a ``classes.csv``,
            or a folder with ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``) whose
            files share names (an image's ``_0000`` channel suffix is dropped when matching).

    Raises:
        DataError: naming the missing file, column or folder.
    """
    src = Path(source)
    csv_path = src if src.is_file() else src / "classes.csv"
    if csv_path.is_file():
        columns, rows = _read_csv(csv_path)
        image_col = next((c for c in ("path", "image") if c in columns), None)
        label_col = next((c for c in ("segmentation", "label_map") if c in columns), None)
        if image_col is None or label_col is None:
            raise DataError(
                f"{str(csv_path)!r} needs an image column ('path' or 'image') and a label-map "
                f"column ('segmentation' or 'label_map'), has {columns}"
            )
        pairs = []
        for line, row in enumerate(rows, start=2):
            files = []
            for col in (image_col, label_col):
                value = (row.get(col) or "").strip()
                if not value:
                    raise DataError(f"{str(csv_path)!r} line {line}: empty {col!r}")
                file = Path(value) if Path(value).is_absolute() else csv_path.parent / value
                if not file.exists():
                    raise DataError(f"{str(csv_path)!r} line {line}: {str(file)!r} does not exist")
                files.append(str(file))
            pairs.append((files[0], files[1]))
    else:
        folders = next(
            ((src / i, src / lab) for i, lab in (("images", "labels"), ("imagesTr", "labelsTr"))
             if (src / i).is_dir() and (src / lab).is_dir()),
            None,
        )  # fmt: skip
        if folders is None:
            raise DataError(
                f"{str(src)!r} is neither a CSV nor a folder with classes.csv, images/ + labels/ "
                "or imagesTr/ + labelsTr/"
            )
        labels = {_stem(p): p for p in folders[1].iterdir() if not p.name.startswith(".")}
        pairs = []
        for image in sorted(folders[0].iterdir()):
            if image.name.startswith("."):
                continue
            stem = _stem(image)
            label = labels.get(stem) or labels.get(stem.removesuffix("_0000"))
            if label is None:
                raise DataError(f"no label map for {str(image)!r} in {str(folders[1])!r}")
            pairs.append((str(image), str(label)))
    if not pairs:
        raise DataError(f"{str(source)!r} lists no labelled images")
    return sorted(pairs, key=lambda p: Path(p[0]).as_posix())
