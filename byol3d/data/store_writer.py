"""Writing the preprocess-once store (:mod:`byol3d.data.store`): in parallel, resumably, and
rebuilding only what changed.

:func:`write_store` takes the deterministic preprocessing as an argument (for a config,
``byol3d.transforms.build_transforms(cfg)[0]``: what the RAM and disk caches hold), so the
data layer never imports the transforms; ``byol3d preprocess CONFIG`` and ``byol3d pretrain``
with ``data.cache: store`` call it that way.

- **Parallel:** ``workers`` processes (a ``ProcessPoolExecutor``, one torch thread each)
  preprocess one source each and write its array themselves; the parent only records.
- **Resumable:** each array is written to a temporary file and renamed into place, and each
  finished volume is appended to ``manifest.partial.jsonl`` at once; a killed run leaves the
  finished volumes on record and the next run goes on with the rest.
- **Invalidation:** the manifest holds a hash of the preprocessing config: any change to it
  rebuilds every array (the log names the changed setting). Per source, a changed size or
  mtime (or SHA-256 content hash with ``hash_sources``) rebuilds that source only. Sources no
  longer on disk are dropped with their arrays; sources on disk but not listed this time are
  kept for a later run that lists them.
- **Bad files** are found here, once: with ``on_bad_file="error"`` the first one stops with
  its name; with ``"skip"`` each gets one warning line naming it and is recorded in the
  manifest, so later runs skip it without reading it again (until it changes).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import PathLike
from tqdm.auto import tqdm

from byol3d.checks import check_number
from byol3d.data.readers import as_tensor, find_data_error
from byol3d.data.store import (
    FORMAT,
    JOURNAL,
    MANIFEST,
    STORE_VERSION,
    Store,
    preprocess_hash,
    read_manifest,
    source_key,
    source_paths,
    source_signature,
)
from byol3d.errors import DataError

__all__ = ["StoreReport", "write_store"]

logger = logging.getLogger("byol3d")


@dataclass
class StoreReport:
    """What :func:`write_store` did: the store, and counts of written, kept and bad volumes."""

    store: Store
    written: int = 0
    kept: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (source, problem): all known
    new_bad: int = 0
    seconds: float = 0.0
    reason: str = ""  # why everything was rebuilt, when it was


def _sha256(key: str) -> str:
    """SHA-256 of a source's bytes (of a folder: its files' names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for path in source_paths(key):
        names = sorted(os.listdir(path)) if os.path.isdir(path) else [None]
        for name in names:
            file = path if name is None else os.path.join(path, name)
            if name is not None:
                if not os.path.isfile(file):
                    continue
                digest.update(name.encode())
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _compact(arr: np.ndarray) -> np.ndarray:
    """float16 for float arrays (float32 if a value lies beyond float16's range, 65504);
    integer arrays (uint8 frames) as they are."""
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    half = arr.astype(np.float16)
    return half if np.isfinite(half).all() else arr.astype(np.float32)


def _save(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary file, then an atomic rename: never a half-written array."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
        os.replace(tmp, path)
    except OSError as err:  # e.g. a full disk: one line naming the file, the rest is kept
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the store file {path}: {err}") from err


def _geometry(img: Any, dims: int) -> tuple[list[float] | None, list[list[float]] | None]:
    """(spacing per spatial axis, affine) of a preprocessed MetaTensor; (None, None) without."""
    affine = getattr(img, "affine", None)
    if affine is None:
        return None, None
    a = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    spacing = np.sqrt((a[:-1, :-1] ** 2).sum(axis=0))[:dims]
    return [float(s) for s in spacing], a.tolist()


class _Builder:
    """Preprocesses one source and writes its array: ``(source, signature) -> record``."""

    def __init__(self, preprocess: Callable, folder: Path, key: str, hash_sources: bool) -> None:
        self.preprocess, self.folder, self.key = preprocess, folder, key
        self.hash_sources = hash_sources

    def __call__(self, task: tuple[str, dict[str, int]]) -> dict[str, Any]:
        source, signature = task
        record: dict[str, Any] = {"source": source, **signature}
        if self.hash_sources:
            record["sha256"] = _sha256(source)
        paths = source_paths(source)
        item = paths if source.startswith("[") else source  # channel files as a list
        try:
            img = self.preprocess({self.key: item})[self.key]
        except Exception as exc:  # noqa: BLE001 - only user-data errors are kept, others re-raised
            err = find_data_error(exc)
            if err is None:
                raise
            return {**record, "problem": str(err).splitlines()[0]}
        arr = as_tensor(img).detach().cpu().numpy()
        file = f"arrays/{hashlib.sha1(source.encode()).hexdigest()[:20]}.npy"
        stored = _compact(arr)
        _save(self.folder / file, stored)
        spacing, affine = _geometry(img, arr.ndim - 1)
        stats = {
            "min": float(arr.min()),
            "max": float(arr.max()),
            "mean": float(arr.mean(dtype=np.float64)),
            "std": float(arr.std(dtype=np.float64)),
        }
        return {**record, "file": file, "shape": list(arr.shape), "dtype": str(stored.dtype),
                "spacing": spacing, "affine": affine, "stats": stats}  # fmt: skip


_BUILDER: _Builder | None = None  # the worker process's builder, set by _init_worker


def _init_worker(builder: _Builder) -> None:
    global _BUILDER
    torch.set_num_threads(1)  # one process per core: no thread oversubscription
    _BUILDER = builder


def _run_in_worker(task: tuple[str, dict[str, int]]) -> dict[str, Any]:
    assert _BUILDER is not None
    return _BUILDER(task)


def _results(builder: _Builder, tasks: list, workers: int) -> Iterator[dict[str, Any]]:
    """Records of ``tasks`` as they finish: in this process, or in a pool of ``workers``."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(builder, tasks)
        return
    with cf.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), initializer=_init_worker, initargs=(builder,)
    ) as pool:
        futures = [pool.submit(_run_in_worker, t) for t in tasks]
        try:
            for future in cf.as_completed(futures):
                yield future.result()
        finally:  # an error, an interrupt, or a stop on a bad file: drop what has not started
            for future in futures:
                future.cancel()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the store folder (two writers never interleave)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs) or f"store version {STORE_VERSION}"


def _valid(folder: Path, entry: Mapping[str, Any], signature: dict, hash_sources: bool) -> bool:
    """The recorded entry still describes the source, and its array (if any) is whole."""
    if entry.get("size") != signature["size"] or entry.get("mtime_ns") != signature["mtime_ns"]:
        return False
    if hash_sources and entry.get("sha256") != _sha256(entry["source"]):
        return False
    if "file" not in entry:
        return True  # a bad file, unchanged
    need = int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize
    path = folder / entry["file"]
    return path.is_file() and path.stat().st_size >= need


def _plan(folder, old, sources, hash_sources):
    """(kept entries, kept bad records, tasks, entries to delete) for ``sources``."""
    known = {e["source"]: e for e in [*old["entries"], *old["bad"]]}
    kept: dict[str, dict] = {}
    tasks, drop = [], []
    for source in sources:
        try:
            signature = source_signature(source)
        except OSError as err:
            raise DataError(f"cannot read {source}: {err.strerror or err}") from err
        entry = known.pop(source, None)
        if entry is not None and _valid(folder, entry, signature, hash_sources):
            kept[source] = entry
        else:
            tasks.append((source, signature))
    for source, entry in known.items():  # not listed now: kept while the source exists
        exists = all(os.path.exists(p) for p in source_paths(source))
        (kept.__setitem__(source, entry) if exists else drop.append(entry))
    entries = {s: e for s, e in kept.items() if "file" in e}
    bad = {s: e for s, e in kept.items() if "problem" in e}
    return entries, bad, tasks, drop


def _write_manifest(folder: Path, header: dict, entries: dict, bad: dict) -> dict:
    manifest = {**header, "entries": list(entries.values()), "bad": list(bad.values())}
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def write_store(
    files: Sequence[PathLike | Sequence[PathLike]],
    preprocess: Callable,
    folder: PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    workers: int = 0,
    on_bad_file: str = "error",
    hash_sources: bool = False,
    progress: bool = True,
) -> StoreReport:
    """Bring the store in ``folder`` up to date with ``files`` under ``preprocess``.

    Args:
        files: image paths, DICOM series folders, or lists of channel files (one list per
            subject), as :func:`byol3d.data.discovery.list_images` gives them.
        preprocess: the deterministic transform, ``{key: path} -> {key: (C, *spatial)}``,
            e.g. :func:`byol3d.transforms.ct_preprocess` or
            :func:`byol3d.transforms.frames.frame_preprocess`.
        folder: the store folder (created).
        config: what identifies the preprocessing; default ``preprocess.config`` (the
            arguments a :class:`byol3d.transforms.ct.PreprocessCompose` was built with).
        workers: processes that preprocess in parallel (0 or 1: this process).
        on_bad_file: ``"error"`` (stop at the first unusable file, naming it) or ``"skip"``
            (warn once per unusable file, record it, go on).
        hash_sources: also record and check each source's SHA-256 (reads every source at
            every call; size and mtime are checked always).
        progress: a progress bar while preprocessing.

    Returns:
        A :class:`StoreReport`; ``report.store`` is the up-to-date :class:`Store`.

    Raises:
        ValueError: a bad ``workers`` or ``on_bad_file``, or a ``preprocess`` without config.
        DataError: a missing source; an unusable one with ``on_bad_file="error"``; no usable one.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    check_number("workers", workers, 0, integer=True)
    config = dict(config if config is not None else getattr(preprocess, "config", None) or {})
    if not config:
        raise ValueError("preprocess has no .config: pass config= (what identifies it)")
    start, folder = time.perf_counter(), Path(folder).expanduser()
    (folder / "arrays").mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "version": STORE_VERSION, "preprocess": config,
              "preprocess_hash": preprocess_hash(config)}  # fmt: skip
    with _locked(folder):
        report = _update(folder, header, list(dict.fromkeys(map(source_key, files))),
                         preprocess, workers, on_bad_file, hash_sources, progress)  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def _update(folder, header, sources, preprocess, workers, on_bad_file, hash_sources, progress):
    """:func:`write_store` inside the lock."""
    for tmp in (folder / "arrays").glob("*.tmp"):  # a killed worker's half-written array
        tmp.unlink(missing_ok=True)
    old = read_manifest(folder)
    interrupted = (folder / JOURNAL).is_file()
    reason = ""
    if old is None:
        old, reason = {"entries": [], "bad": []}, "a new store"
    elif old.get("preprocess_hash") != header["preprocess_hash"]:
        reason = "preprocessing changed (" + _changed_settings(old.get("preprocess", {}), header["preprocess"]) + ")"  # fmt: skip
        old = {"entries": [], "bad": []}  # every array is rebuilt (same names: overwritten)
    entries, bad, tasks, drop = _plan(folder, old, sources, hash_sources)
    for entry in drop:
        if "file" in entry:
            (folder / entry["file"]).unlink(missing_ok=True)
    listed = set(sources)
    known_bad = [b for s, b in bad.items() if s in listed]
    if known_bad and on_bad_file == "error":
        raise DataError(known_bad[0]["problem"])
    if known_bad:
        logger.info("%d files found unusable when the store was written are skipped (listed "
                    "in %s)", len(known_bad), folder / MANIFEST)  # fmt: skip
    report = StoreReport(store=None, kept=len(sources) - len(tasks) - len(known_bad))  # type: ignore[arg-type]
    if tasks or drop or interrupted or reason:
        if reason and tasks:
            logger.info("store %s: %s; preprocessing %d volumes", folder, reason, len(tasks))
        elif tasks:
            logger.info("store %s: preprocessing %d new or changed volumes (%d kept)",
                        folder, len(tasks), report.kept)  # fmt: skip
        _write_manifest(folder, header, entries, bad)  # the state so far, then the journal
        _build(folder, header, tasks, entries, bad, preprocess, workers, on_bad_file,
               hash_sources, progress, report)  # fmt: skip
        manifest = _write_manifest(folder, header, entries, bad)
        (folder / JOURNAL).unlink(missing_ok=True)
    else:
        manifest = {**header, "entries": list(entries.values()), "bad": list(bad.values())}
    report.store, report.reason = Store(folder, manifest), reason
    report.bad = [(b["source"], b["problem"]) for s, b in bad.items() if s in listed]
    if len(report.bad) == len(sources):
        raise DataError(f"none of the {len(sources)} files can be used, e.g. {report.bad[0][1]}")
    return report


def _build(folder, header, tasks, entries, bad, preprocess, workers, on_bad_file,
           hash_sources, progress, report) -> None:  # fmt: skip
    """Run ``tasks``, journalling each finished record; fills ``entries`` and ``bad``."""
    builder = _Builder(preprocess, folder, header["preprocess"].get("keys", ["image"])[0], hash_sources)  # fmt: skip
    with (
        open(folder / JOURNAL, "w") as journal,
        tqdm(
            total=len(tasks), desc="preprocessing", disable=not progress or not tasks, leave=False
        ) as bar,
    ):
        journal.write(json.dumps(header) + "\n")
        journal.flush()
        for record in _results(builder, tasks, workers):
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            bar.update()
            source = record["source"]
            if "problem" in record:
                bad[source] = record
                report.new_bad += 1
                if on_bad_file == "error":
                    raise DataError(record["problem"])
                logger.warning("skipping an unusable file: %s", record["problem"])
            else:
                entries[source] = record
                report.written += 1
