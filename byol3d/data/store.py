"""The preprocess-once store: every volume's deterministic preprocessing, once, as ``.npy``.

A store is a folder written by ``byol3d preprocess CONFIG`` (or on first use by
``byol3d pretrain`` with ``data.cache: store``; the writer is
:func:`byol3d.data.store_writer.write_store`):

    STORE/manifest.json       one file: the preprocessing config and its hash, and per volume
                              its source (path, size, mtime_ns, optional SHA-256), array file,
                              shape, dtype, spacing, affine and intensity statistics; the
                              files found unusable, with the reason
    STORE/arrays/<key>.npy    the preprocessed array, (C, *spatial): float16 for float
                              outputs (CT after windowing), uint8 for frames (their dtype)

Start-up reads ``manifest.json`` (and stats every source, to notice changed files), not one
header per volume. Training memory-maps each array (``np.load(mmap_mode="r")``) and the first
random crop of each view reads only its box (:class:`StoreItems`); every process of a node
reads through the same page cache, so DDP ranks hold no private copy of the data.

Why ``.npy`` with float16 rather than blosc2 (nnU-Net's choice): measured in
``scripts/benchmark.py`` (the ``store_format`` rows, docs/benchmarks.md) on a CT-like
256x256x200 volume, reading a 96^3 crop from a warm page cache takes 6.5 ms from the
memory-mapped ``.npy`` against 8.7 ms (blosc2 LZ4) and 12.8 ms (ZSTD), and blosc2 files are
only 0.82x (LZ4) and 0.60x (ZSTD) of the float16 ``.npy``: noise in CT compresses poorly. A
memory map also lets all ranks share one decompressed copy in the page cache (blosc2
decompresses in every process), needs no extra dependency, and float16 already halves the
float32 cache. float16 keeps 11 significant bits: in the [0, 1] window units an error of at
most 2.4e-4 (0.5 HU with the default 2000 HU window).

>>> from byol3d.data.store import open_store
>>> store = open_store("runs/ct/store")                       # doctest: +SKIP
>>> len(store), store.array(0).shape, store.meta(0)["spacing"]  # doctest: +SKIP
(2000, (1, 212, 160, 301), [1.5, 1.5, 1.5])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike

from byol3d.errors import DataError

__all__ = [
    "MANIFEST",
    "Store",
    "StoreItems",
    "open_store",
    "preprocess_hash",
    "source_key",
    "source_paths",
]

#: The manifest's file name inside a store folder.
MANIFEST = "manifest.json"
#: Entries finished since the manifest was last written, one JSON object a line.
JOURNAL = "manifest.partial.jsonl"
#: Bumped when the array layout or the manifest changes meaning (then every array is rebuilt).
STORE_VERSION = 1
FORMAT = "byol3d-store"


def _absolute(path: PathLike) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def source_key(item: PathLike | Sequence[PathLike]) -> str:
    """What identifies a source in the manifest: its absolute path (a file or a DICOM folder),
    or for a multi-channel subject (a list of files, one per channel) the JSON list of them."""
    if isinstance(item, (list, tuple)):
        return json.dumps([_absolute(p) for p in item])
    return _absolute(item)


def source_paths(key: str) -> list[str]:
    """The files (or folders) behind a :func:`source_key`."""
    return json.loads(key) if key.startswith("[") else [key]  # an absolute path never starts "["


def preprocess_hash(config: Mapping[str, Any]) -> str:
    """A digest of the preprocessing config (and the store version); any change changes it."""
    text = json.dumps(
        {"store_version": STORE_VERSION, "preprocess": config}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_signature(key: str) -> dict[str, int]:
    """``{"size", "mtime_ns"}`` of a source: its files' total size and newest mtime (of a DICOM
    folder, of the files in it: a slice added, removed or rewritten changes it).

    Raises:
        OSError: when a path is gone.
    """
    parts = [_signature(p) for p in source_paths(key)]
    return {"size": sum(p["size"] for p in parts), "mtime_ns": max(p["mtime_ns"] for p in parts)}


def _signature(path: str) -> dict[str, int]:
    st = os.stat(path)
    if not os.path.isdir(path):
        return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    size, mtime = 0, int(st.st_mtime_ns)
    with os.scandir(path) as it:
        for e in it:
            if e.is_file():
                s = e.stat()
                size, mtime = size + int(s.st_size), max(mtime, int(s.st_mtime_ns))
    return {"size": size, "mtime_ns": mtime}


def read_manifest(folder: PathLike) -> dict[str, Any] | None:
    """The manifest of ``folder`` with the journal of an interrupted write applied; None if
    the folder holds neither. A journal line cut short by a kill is ignored.

    Raises:
        DataError: a manifest that is not a byol3d store's (named).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = None
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read the store manifest {path}: {err}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{path} is not a byol3d store manifest")
    journal = folder / JOURNAL
    if not journal.is_file():
        return manifest
    lines = []
    for line in journal.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # the last line of a killed write
            continue
    header = next((x for x in lines if "preprocess_hash" in x), None)
    if header is None:
        return manifest
    if manifest is None or manifest.get("preprocess_hash") != header["preprocess_hash"]:
        manifest = {**header, "entries": [], "bad": []}
    entries = {e["source"]: e for e in manifest["entries"]}
    bad = {b["source"]: b for b in manifest["bad"]}
    for x in lines:
        if "file" in x:
            entries[x["source"]], _ = x, bad.pop(x["source"], None)
        elif "problem" in x:
            bad[x["source"]], _ = x, entries.pop(x["source"], None)
    return {**manifest, "entries": list(entries.values()), "bad": list(bad.values())}


class Store:
    """A written store: ``len(store)`` volumes, each a read-only memory map and its metadata.

    Attributes:
        folder: the store folder.
        preprocess: the preprocessing config the arrays were written with.
        preprocess_hash: :func:`preprocess_hash` of it.
        entries: per volume, the manifest's record (``source``, ``file``, ``shape``, ...).
        bad: ``{"source", "problem", ...}`` of every file found unusable while writing.
    """

    def __init__(self, folder: PathLike, manifest: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.preprocess = dict(manifest["preprocess"])
        self.preprocess_hash = str(manifest["preprocess_hash"])
        self.entries = list(manifest["entries"])
        self.bad = list(manifest["bad"])
        self._index = {e["source"]: i for i, e in enumerate(self.entries)}

    def __len__(self) -> int:
        return len(self.entries)

    def array(self, i: int) -> np.memmap:
        """Volume ``i`` as a read-only ``np.memmap`` of shape ``(C, *spatial)``.

        Nothing is read until it is sliced: ``store.array(i)[:, 10:74, 0:64, 5:69]`` reads
        that box (and the file system's pages around it). The map is opened on each call (a
        few tens of microseconds), so no file handle is held per volume.
        """
        path = self.folder / self.entries[i]["file"]
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(
                f"cannot read {path} of the store (source {self.entries[i]['source']}): {err}; "
                "run byol3d preprocess again"
            ) from err

    def meta(self, i: int) -> dict[str, Any]:
        """``{"source", "shape", "dtype", "spacing", "affine", "stats"}`` of volume ``i``.

        ``spacing`` is in mm per spatial axis after preprocessing, ``affine`` the (d+1)^2
        voxel-to-world matrix of the array (RAS), ``stats`` the ``min``, ``max``, ``mean`` and
        ``std`` of its values.
        """
        e = self.entries[i]
        keys = ("source", "shape", "dtype", "spacing", "affine", "stats")
        return {k: e.get(k) for k in keys}

    def index(self, source: PathLike | Sequence[PathLike]) -> int:
        """The position of ``source`` (a path, or a list of channel files, as listed for
        training) in the store.

        Raises:
            DataError: naming the source when the store does not hold it.
        """
        key = source_key(source)
        if key not in self._index:
            raise DataError(
                f"{source} is not in the store {self.folder} (written for other files); "
                "run byol3d preprocess CONFIG for this data"
            )
        return self._index[key]

    def nbytes(self) -> int:
        """Bytes on disk: the arrays and the manifest."""
        files = [self.folder / e["file"] for e in self.entries] + [self.folder / MANIFEST]
        return sum(f.stat().st_size for f in files if f.exists())


def open_store(folder: PathLike) -> Store:
    """The store written in ``folder`` (reads ``manifest.json`` only).

    Raises:
        DataError: when ``folder`` holds no store, or an unfinished one.
    """
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        raise DataError(
            f"no store in {folder} (no {MANIFEST}): write it with byol3d preprocess CONFIG"
        )
    manifest = read_manifest(folder)
    if (Path(folder) / JOURNAL).is_file():
        raise DataError(
            f"the store in {folder} was interrupted while being written: run byol3d preprocess "
            "CONFIG again to finish it (finished volumes are kept)"
        )
    return Store(folder, manifest)


class StoreItems(Sequence):
    """The store's volumes for a list of sources, as ``{key: np.memmap}`` items, lazily.

    The base of a :class:`byol3d.data.datasets.ViewDataset` with ``cache="store"``: item
    ``i`` maps the array without reading it; the random resized crop that starts each view
    (:class:`byol3d.transforms.crops.RandResizedCropd`) draws its box from the full shape and
    slices only that box, so a sample reads two boxes, not the volume. Picklable (DataLoader
    workers, spawn): it holds the folder and the entries, never an open map.

    Args:
        store: an open :class:`Store`.
        sources: the paths to serve, in order (each must be in the store).
        key: the item key (the preprocessing's image key).

    Raises:
        DataError: naming a source the store does not hold.
    """

    def __init__(self, store: Store, sources: Sequence[Any], key: str = "image") -> None:
        self.store, self.key = store, key
        self.indices = [store.index(s) for s in sources]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return {self.key: self.store.array(self.indices[i])}
