"""Datasets: a (cached) two-view dataset of image files, its memory cost, bad-file checks.

>>> from byol3d.data.datasets import build_dataset
>>> from byol3d.data.discovery import find_images, split_train_val
>>> from byol3d.transforms import ct_preprocess, view_transforms
>>> files = find_images("/data/ct")                          # doctest: +SKIP
>>> train, val = split_train_val(files, val_fraction=0.1, seed=0)  # doctest: +SKIP
>>> ds = build_dataset(train, ct_preprocess(), view_transforms(), cache="cache")  # doctest: +SKIP
>>> sorted(ds[0])                                            # doctest: +SKIP
['view1', 'view1_box', 'view1_flip', 'view1_rot90', 'view2', 'view2_box', 'view2_flip', 'view2_rot90']

The deterministic preprocessing is what gets cached (in RAM with ``cache="cache"``, on disk
with ``cache="persistent"``, or read from the preprocess-once store of
:mod:`byol3d.data.store` with ``cache="store"``); the random views are drawn on top of the
cached item at every access, by :class:`ViewDataset`, and never write into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import PathLike
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose, LoadImaged, Spacingd, SpatialPadd, apply_transform

from byol3d.checks import check_number
from byol3d.data.dicom import series_files
from byol3d.data.discovery import is_image
from byol3d.data.frame_reader import frame_std
from byol3d.data.readers import data_errors_unwrapped, find_data_error
from byol3d.data.store import StoreItems, open_store, preprocess_hash
from byol3d.errors import DataError

logger = logging.getLogger("byol3d")


#: Values of ``build_dataset(cache=...)``.
CACHE_KINDS = ("none", "cache", "persistent", "store")


def _header_geometry(path: str) -> tuple[list[int], list[float], int]:
    """(spatial shape, spacing, channels) of an image, from its header only."""
    if is_image(path) and path.lower().endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        shape = list(img.shape)
        spacing = list(nib.affines.voxel_sizes(img.affine))
        return shape[:3], spacing[: len(shape[:3])], int(np.prod(shape[3:], dtype=np.int64))
    reader = sitk.ImageFileReader()
    if os.path.isdir(path):
        names = series_files(path)[0]
        reader.SetFileName(names[0])
        reader.ReadImageInformation()
        size, spacing = list(reader.GetSize()[:2]), list(reader.GetSpacing()[:2])
        z = spacing[0]
        if len(names) > 1:
            origin = np.asarray(reader.GetOrigin())
            reader.SetFileName(names[1])
            reader.ReadImageInformation()
            z = float(np.linalg.norm(np.asarray(reader.GetOrigin()) - origin)) or z
        return [*size, len(names)], [*spacing, z], reader.GetNumberOfComponents()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size, spacing = list(reader.GetSize()), list(reader.GetSpacing())
    channels = reader.GetNumberOfComponents() * int(np.prod(size[3:], dtype=np.int64))
    return size[:3], spacing[:3], channels


def estimate_cache_bytes(
    files: Sequence[PathLike],
    pixdim: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
) -> int:
    """Upper bound of the memory (or disk) the preprocessed images take, in bytes.

    Reads only the headers (nibabel, or SimpleITK ``ReadImageInformation``), then applies
    the resampling to ``pixdim`` and the padding to ``roi_size`` to the shape, at 4 bytes a
    voxel (float32). The foreground crop is not known before loading, hence an upper bound.

    Args:
        files: image paths or DICOM series folders (or lists of a subject's channel files).
        pixdim: the target spacing of ``Spacingd``, or None for native spacing.
        roi_size: the ``SpatialPadd`` size, or None.

    Raises:
        DataError: naming a file whose header cannot be read.
    """
    total = 0
    for f in files:
        many = isinstance(f, (list, tuple))  # channel files of one subject: the first's grid
        path = str(f[0] if many else f)
        try:
            shape, spacing, channels = _header_geometry(path)
            channels = max(channels, 1) * (len(f) if many else 1)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"cannot read the header of {path}: {str(err).strip().splitlines()[-1]}"
            ) from err
        if pixdim is not None:
            shape = [math.ceil(n * s / p) for n, s, p in zip(shape, spacing, pixdim, strict=False)]
        if roi_size is not None:
            shape = [max(n, r) for n, r in zip(shape, roi_size, strict=False)]
        total += 4 * max(channels, 1) * int(np.prod(shape, dtype=np.int64))
    return total


def _human(n: float) -> str:
    """Bytes as a short human-readable size, e.g. ``14.2 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class SeededSampler(torch.utils.data.Sampler):
    """A sampler of ``(index, seed)`` pairs whose order and seeds follow ``(seed, epoch, rank)``.

    Each epoch's seed is derived from the run's ``seed``, the epoch (``set_epoch``, called at
    every epoch start) and the process rank; it orders a ``RandomSampler`` (its generator is
    seeded from it) and travels to the workers with each index, so a :class:`ViewDataset`
    draws sample ``i``'s views from ``(epoch seed, i)`` alone: the same order and views with
    0, 2 or 8 workers, persistent or not (persistent workers draw nothing from torch's
    generator at an epoch start), and after a resume. ``set_epoch`` is forwarded to a
    ``DistributedSampler`` (which shuffles by its own seed and epoch).
    """

    def __init__(self, base: torch.utils.data.Sampler, seed: int = 0, rank: int = 0) -> None:
        self.base, self.seed, self.rank, self.epoch = base, int(seed), int(rank), 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        entropy = [self.seed, self.epoch, self.rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31))
        if isinstance(self.base, torch.utils.data.RandomSampler):
            self.base.generator = torch.Generator().manual_seed(seed)
        for index in self.base:
            yield int(index), seed


class ViewDataset(Dataset):
    """Random views on top of a dataset of preprocessed items, leaving those items intact.

    ``ViewDataset(base, views)[i]`` is ``views(dict(base[i]))``: ``base`` runs (or reads from
    its cache) the deterministic preprocessing, ``views`` draws the random views. Keeping
    the two apart means the cache holds one preprocessed image per file (not the view
    copies), and the cached item is only read: ``CacheDataset`` returns its cached dict by
    reference when its transform has no random part, the dict is copied here, and
    the view transforms never write into it (each view starts with a crop into a new tensor).

    MONAI's ``DataLoader`` seeds the view transforms in every worker (``set_rnd`` walks
    ``data`` and ``transform``); a plain torch ``DataLoader`` needs
    ``worker_init_fn=monai.data.utils.worker_init_fn``, or all workers draw the same views.

    A :class:`DataError` raised while preprocessing (an unusable file) is re-raised as such,
    not wrapped in MONAI's ``RuntimeError``.

    Args:
        base: a dataset of preprocessed items (``monai.data.Dataset``/``CacheDataset``/...).
        views: the random transform, e.g. :func:`byol3d.transforms.view_transforms`.
    """

    def __init__(self, base: Sequence, views: Callable) -> None:
        super().__init__(data=base, transform=views)
        self.cache_bytes: int | None = None

    def __getitem__(self, index):
        """``index`` or ``(index, seed)`` (:class:`SeededSampler`): then the views are drawn
        with the view transform seeded from ``(seed, index)``."""
        if isinstance(index, tuple) and len(index) == 2:
            index, seed = index
            state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]
            self.transform.set_random_state(seed=int(state))
        return super().__getitem__(index)

    def _transform(self, index: int) -> Any:
        with data_errors_unwrapped():
            item = self.data[index]
        return apply_transform(self.transform, dict(item))


def _first_of(compose: Any, kind: type) -> Any:
    if not isinstance(compose, Compose):
        return None
    return next((t for t in compose.flatten().transforms if isinstance(t, kind)), None)


class _ConfigHash:
    """``hash_transform`` for ``PersistentDataset``: a digest of the preprocessing config.

    MONAI does not hash its transforms' parameters (only their class names), so a changed
    ``pixdim`` would silently reuse stale cache files; the config goes into the file names.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        text = json.dumps({"byol3d_preprocess": 1, **config}, sort_keys=True, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]

    def __call__(self, _transforms: Any) -> bytes:
        return self.digest.encode()


def build_dataset(
    files: Sequence[PathLike | Mapping[str, Any]],
    preprocess: Compose,
    views: Callable,
    cache: str = "cache",
    cache_dir: PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = True,
) -> ViewDataset:
    """A two-view dataset: preprocess (cached as asked), then fresh random views each access.

    Args:
        files: image paths (wrapped as ``{"image": path}``, the key taken from the loader of
            ``preprocess``) or ready data rows (dicts).
        preprocess: the deterministic transform, e.g. :func:`byol3d.transforms.ct_preprocess`.
        views: the random transform, e.g. :func:`byol3d.transforms.view_transforms`.
        cache: ``"none"`` (load and preprocess at every access), ``"cache"`` (keep the
            preprocessed images in RAM: ``monai.data.CacheDataset``) or ``"persistent"``
            (keep them on disk in ``cache_dir``: ``monai.data.PersistentDataset``; the file
            names carry a hash of the preprocessing config, so changing it never reuses
            stale files). Before caching, the cost is logged (and warned about when it
            exceeds the available RAM or disk). ``"store"``: memory-map the arrays of the
            store in ``cache_dir`` (written beforehand by
            :func:`byol3d.data.store_writer.write_store` with this ``preprocess``); each view's
            crop reads only its box, and processes share the page cache.
        cache_dir: the folder for ``cache="persistent"`` or ``"store"`` (required then).
        cache_rate: fraction of the items kept in RAM with ``cache="cache"`` (the rest are
            preprocessed at every access).
        num_workers: threads that fill the RAM cache (0 or 1: one thread).
        progress: show a progress bar while filling the RAM cache.

    Returns:
        A :class:`ViewDataset`; its ``cache_bytes`` holds the estimate (None for "none").

    Raises:
        ValueError: for a bad ``cache``, ``cache_dir``, ``cache_rate`` or ``num_workers``.
        DataError: for a file that cannot be used (named in the message).
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {', '.join(CACHE_KINDS)}, got {cache!r}")
    check_number("cache_rate", cache_rate, 0.0, 1.0)
    check_number("num_workers", num_workers, 0, integer=True)
    if cache in ("persistent", "store") and not cache_dir:
        raise ValueError(f"cache_dir must be given for cache={cache!r}")
    loader = _first_of(preprocess, LoadImaged)
    key = loader.keys[0] if loader is not None else "image"
    rows = [_row(f, key) for f in files]
    if cache == "none":
        return ViewDataset(Dataset(rows, transform=preprocess), views)
    if cache == "store":
        return _store_dataset(rows, key, preprocess, views, cache_dir)

    spacing, pad = _first_of(preprocess, Spacingd), _first_of(preprocess, SpatialPadd)
    pixdim = None if spacing is None else spacing.spacing_transform.pixdim
    roi = None if pad is None else pad.padder.spatial_size
    n = int(len(rows) * cache_rate) if cache == "cache" else len(rows)  # CacheDataset's count
    paths = [r[key] for r in rows[:n] if isinstance(r.get(key), (str, os.PathLike, list))]
    est = estimate_cache_bytes(paths, pixdim=pixdim, roi_size=roi)
    with data_errors_unwrapped():
        if cache == "cache":
            base = _ram_cache(rows, preprocess, est, n, cache_rate, num_workers, progress)
        else:
            base = _disk_cache(rows, preprocess, est, Path(cache_dir).expanduser())
    dataset = ViewDataset(base, views)
    dataset.cache_bytes = est
    return dataset


def _row(item: Any, key: str) -> dict:
    """A data row: a dict as given, a list of channel files kept as a list, else a path."""
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (list, tuple)):
        return {key: [str(p) for p in item]}
    return {key: str(item)}


_COST_NOTE = "float32 after preprocessing, upper bound before foreground crop"


def _store_dataset(rows: list[dict], key: str, preprocess, views, folder) -> ViewDataset:
    """Views over the store in ``folder``, after checking it holds this preprocessing."""
    store = open_store(Path(folder).expanduser())
    config = getattr(preprocess, "config", None)
    if config and preprocess_hash(config) != store.preprocess_hash:
        raise DataError(
            f"the store in {store.folder} was written with other preprocessing settings "
            f"({store.preprocess}); run byol3d preprocess CONFIG again"
        )
    dataset = ViewDataset(StoreItems(store, [r[key] for r in rows], key=key), views)
    dataset.cache_bytes = sum(
        int(np.prod(store.entries[i]["shape"])) * np.dtype(store.entries[i]["dtype"]).itemsize
        for i in dataset.data.indices
    )
    return dataset


def _ram_cache(
    rows: list[dict], preprocess: Compose, est: int, n: int, cache_rate: float,
    num_workers: int, progress: bool,
) -> CacheDataset:  # fmt: skip
    """A ``CacheDataset`` of ``rows``, after logging (and maybe warning about) its cost."""
    logger.info("caching %d volumes in RAM: about %s (%s)", n, _human(est), _COST_NOTE)
    free = _available_ram()
    if free is not None and est > free:
        logger.warning(
            "the RAM cache (about %s) may not fit in the %s available: use cache='persistent' "
            "or a lower cache_rate",
            _human(est),
            _human(free),
        )
    return CacheDataset(
        rows, preprocess, cache_rate=cache_rate, num_workers=max(num_workers, 1), progress=progress
    )


def _disk_cache(rows: list[dict], preprocess: Compose, est: int, folder: Path) -> PersistentDataset:
    """A ``PersistentDataset`` in ``folder`` keyed to the preprocessing, after logging its cost."""
    folder.mkdir(parents=True, exist_ok=True)
    logger.info(
        "caching %d volumes on disk in %s: about %s (%s)",
        len(rows),
        folder,
        _human(est),
        _COST_NOTE,
    )
    free = shutil.disk_usage(folder).free
    if est > free:
        logger.warning(
            "the disk cache (about %s) may not fit in the %s free", _human(est), _human(free)
        )
    config = getattr(preprocess, "config", None)
    hasher = _ConfigHash(config) if config else json_hashing
    return PersistentDataset(rows, preprocess, cache_dir=folder, hash_transform=hasher)


class _FileCheck(torch.utils.data.Dataset):
    """Runs ``preprocess`` on one file and returns ``(index, problem or "")``; never raises DataError."""

    def __init__(self, files: Sequence[Any], preprocess: Callable) -> None:
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            self.preprocess({"image": self.files[index]})
        except Exception as exc:  # noqa: BLE001 - only user-data errors are kept, others re-raised
            err = find_data_error(exc)
            if err is None:
                raise
            return index, str(err).splitlines()[0]
        return index, ""


def check_files(
    files: Sequence[str], preprocess: Callable, num_workers: int = 0
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``files`` into those ``preprocess`` accepts and ``(path, problem)`` for the rest.

    Used by ``data.on_bad_file: skip``: every file is read and preprocessed once up front (in
    ``num_workers`` DataLoader workers), so a corrupt, 4D, NaN or unreadable file is reported
    before training instead of stopping it.
    """
    loader = torch.utils.data.DataLoader(
        _FileCheck(files, preprocess), batch_size=None, num_workers=num_workers
    )
    good, bad = [], []
    for index, problem in loader:
        item = files[int(index)]  # a path, or a subject's list of channel files
        (bad.append((_text(item), problem)) if problem else good.append(item))
    return good, bad


def _text(item: Any) -> str:
    return ",".join(map(str, item)) if isinstance(item, (list, tuple)) else str(item)


class _FrameStd(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> float:
        return frame_std(self.files[index])


def drop_flat_frames(
    files: Sequence[str], min_std: float, num_workers: int = 0
) -> tuple[list[str], list[tuple[str, float]]]:
    """``data.min_frame_std``: split frames into those whose pixel std (0..1 units,
    :func:`byol3d.data.frame_reader.frame_std`) reaches ``min_std`` and ``(path, std)`` of the
    constant, black or near-black rest. Unreadable frames are kept (the bad-file rule decides).
    """
    check_number("min_frame_std", min_std, 0.0)
    loader = torch.utils.data.DataLoader(_FrameStd(files), batch_size=None, num_workers=num_workers)  # fmt: skip
    kept, dropped = [], []
    for path, std in zip(files, loader, strict=True):
        (dropped.append((path, float(std))) if float(std) < min_std else kept.append(path))
    return kept, dropped
