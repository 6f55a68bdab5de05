"""Start-up part of scripts/benchmark.py: command to first step, and the store's size.

On ``n`` small synthetic CT volumes (int16 .nii.gz, 24x24x20 voxels, padded to the 32^3 crop
by the preprocessing), each side runs ``byol3d pretrain`` in a fresh process (a tiny
resnet10, batch 2, 2 DataLoader workers, CPU) and is timed from just before the process
starts until its first training iteration has completed (this script's ``--first-step`` mode
adds that one handler to the trainer and exits there):

- ``startup_ram_cache`` (``data.cache: cache``, today's default): every start reads every header
  for the cost estimate and preprocesses every volume into RAM, so first and later starts cost
  the same; each DDP rank holds its own copy.
- ``startup_disk_cache`` (``data.cache: persistent``): every start reads every header for the
  cost estimate; the cache files are written lazily during the first epoch, not at start-up.
- ``startup_store`` (``data.cache: store``): the first start preprocesses every volume into
  the store (``data.num_workers`` processes), later starts read its manifest and stat the
  sources.
- ``python_import``: ``python -c "import byol3d.training.pretrain"``, the fixed cost inside
  every row (torch, MONAI, Ignite).

Sizes: the store folder (arrays and manifest) against the persistent cache folder once it
holds every volume (today's float32 cache on disk, filled here in-process) and against the
float32 voxels alone. The ``store_format`` rows compare the store's memory-mapped float16
``.npy`` with blosc2 (LZ4 and ZSTD, when installed): size, and the time to read one random
crop into float32 with a warm and a dropped page cache (``posix_fadvise(DONTNEED)``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"startup_ram_cache": "cache", "startup_disk_cache": "persistent", "startup_store": "store"}
TINY_RUN = [
    "model.encoder=resnet10", "model.hidden_dim=32", "model.projection_dim=16",
    "transforms.roi_size=[32,32,32]", "transforms.pixdim=null", "train.batch_size=2",
    "train.max_epochs=1", "train.warmup_epochs=0", "train.progress=false",
    "train.tensorboard=false", "train.device=cpu", "data.num_workers=2", "data.dicom=false",
    "data.val_fraction=0.1",
]  # fmt: skip


def small_volumes(folder: Path, n: int, shape=(24, 24, 20), seed: int = 0) -> list[str]:
    """``n`` int16 CT-like volumes: an ellipsoid of soft tissue with noise, in air."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    paths = []
    for i in range(n):
        radii = rng.uniform(0.6, 0.95, size=3)[:, None, None, None]
        body = ((grid / radii) ** 2).sum(0) < 1
        vol = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, size=shape)
        path = folder / f"ct_{i:05d}.nii.gz"
        nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
        paths.append(str(path))
    return paths


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _first_step(time_file: str, overrides: list[str]) -> None:
    """Child mode: ``byol3d pretrain`` that writes the time of its first step and exits."""
    from ignite.engine import Events

    import byol3d.training.pretrain as pretrain_module
    from byol3d.config import load_config

    original = pretrain_module.attach_training

    def attach_training(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)

        def stop(_engine):
            Path(time_file).write_text(repr(time.time()))
            os._exit(0)  # the measurement ends here; nothing else of the run matters

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), stop)

    pretrain_module.attach_training = attach_training
    pretrain_module.pretrain(load_config(None, overrides))
    raise SystemExit("the run ended before its first step")


def _timed_run(args: list[str], time_file: Path | None) -> float:
    """Seconds from starting ``python args`` to the time it wrote (or to its exit)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    start = time.time()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {proc.stderr.strip()[-1500:]}")
    return (float(time_file.read_text()) if time_file else end) - start


def _fill_persistent(files: list[str], cache_dir: Path) -> float:
    """Write the persistent cache of every volume (what the first epoch does); seconds."""
    from byol3d.config import load_config
    from byol3d.data.datasets import build_dataset
    from byol3d.transforms import build_transforms

    preprocess, views = build_transforms(load_config(None, TINY_RUN))
    start = time.perf_counter()
    ds = build_dataset(files, preprocess, views, cache="persistent", cache_dir=cache_dir)
    for i in range(len(ds)):
        ds.data[i]  # PersistentDataset writes the item's cache file on first access
    return time.perf_counter() - start


def run_startup_benchmark(
    n_volumes: int, later_runs: int = 2, log=print
) -> tuple[list[dict], dict]:
    """Start-up rows per side and the top-level ``startup`` summary of the store side."""
    with tempfile.TemporaryDirectory(prefix="byol3d-startup-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        files = small_volumes(tmp / "ct", n_volumes)
        log(f"startup: wrote {n_volumes} volumes of 24x24x20 in {time.perf_counter() - t:.0f} s")
        imports = [_timed_run(["-c", "import byol3d.training.pretrain"], None) for _ in range(2)]
        seconds: dict[str, list[float]] = {name: [] for name in SIDES}
        for run in range(1 + later_runs):  # the sides alternate within each round
            for name, cache in SIDES.items():
                overrides = [*TINY_RUN, f"data.root={tmp / 'ct'}", f"output_dir={tmp / name}",
                             f"data.cache={cache}", f"data.cache_dir={tmp / (name + '_dir')}"]  # fmt: skip
                time_file = tmp / f"{name}_{run}.time"
                args = [str(Path(__file__).resolve()), "--first-step", str(time_file), *overrides]
                seconds[name].append(_timed_run(args, time_file))
                log(f"startup: {name} run {run + 1}: {seconds[name][-1]:.1f} s to the first step")
            if run == 0:
                fill = _fill_persistent(files, tmp / "startup_disk_cache_dir")
                log(f"startup: filled the persistent cache of {n_volumes} volumes in {fill:.0f} s")
        store = tmp / "startup_store_dir"
        from byol3d.data.store import open_store

        float32 = sum(4 * int(np.prod(e["shape"])) for e in open_store(store).entries)
        sizes = {"startup_store": folder_bytes(store), "startup_disk_cache": folder_bytes(tmp / "startup_disk_cache_dir"),  # fmt: skip
                 "startup_ram_cache": float32}  # fmt: skip
    rows = []
    for name, secs in seconds.items():
        later = statistics.median(secs[1:]) if len(secs) > 1 else None
        rows.append({"section": "startup", "name": name, "cache": SIDES[name], "volumes": n_volumes,
                     "volume_shape": [24, 24, 20], "preprocessed_shape": [32, 32, 32],
                     "seconds_first": secs[0], "seconds_later": later, "seconds_all": secs,
                     "bytes": sizes[name], "python_import_seconds": min(imports)})  # fmt: skip
    rows[1]["fill_seconds"] = fill  # the disk cache's first epoch, done here in-process
    store_row = rows[2]
    startup = {
        f"seconds_to_first_step_{n_volumes}": {
            "first": store_row["seconds_first"],
            "later": store_row["seconds_later"],
        },
        "volumes": n_volumes,
        "python_import_seconds": min(imports),
        "store_bytes": sizes["startup_store"],
        "persistent_cache_bytes": sizes["startup_disk_cache"],
        "float32_voxel_bytes": float32,
    }
    return rows, startup


def store_format_rows(shape=(256, 256, 200), crop: int = 96, reads: int = 30, log=print) -> list[dict]:  # fmt: skip
    """Size and crop-read time of the store's float16 .npy (memory-mapped) vs blosc2."""
    import torch
    import torch.nn.functional as F

    from byol3d.data.synthetic_ct import make_phantom

    coarse = tuple(max(16, s // 4) for s in shape)
    ph = make_phantom(0, shape=coarse, spacing=(6.0, 6.0, 6.0))
    vol = F.interpolate(torch.from_numpy(ph.image.astype(np.float32))[None, None], size=shape,
                        mode="trilinear", align_corners=False)[0, 0].numpy()  # fmt: skip
    vol = vol + np.random.default_rng(0).normal(0, 15, size=shape).astype(np.float32)
    vol = np.clip((vol + 1000) / 2000, 0, 1)[None].astype(np.float16)  # the default window
    rng = np.random.default_rng(1)
    boxes = [(slice(None), *(slice(s := int(rng.integers(0, n - crop + 1)), s + crop) for n in shape))
             for _ in range(reads)]  # fmt: skip
    formats = {"npy_float16_mmap": None}
    try:
        import blosc2

        formats["blosc2_lz4"] = {"codec": blosc2.Codec.LZ4, "clevel": 5}
        formats["blosc2_zstd"] = {"codec": blosc2.Codec.ZSTD, "clevel": 3}
    except ImportError:
        blosc2 = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="byol3d-format-") as tmp:
        for name, cparams in formats.items():
            path = Path(tmp) / f"{name}.{'npy' if cparams is None else 'b2nd'}"
            t = time.perf_counter()
            if cparams is None:
                np.save(path, vol)
                read = lambda box, p=path: np.array(np.load(p, mmap_mode="r")[box], np.float32)  # noqa: E731
            else:
                blosc2.asarray(vol, chunks=(1, 64, 64, 64), blocks=(1, 16, 16, 16), urlpath=str(path),
                               mode="w", cparams={**cparams, "typesize": 2, "nthreads": 1})  # fmt: skip
                read = lambda box, p=path: blosc2.open(str(p), mode="r")[box].astype(np.float32)  # noqa: E731
            write = time.perf_counter() - t
            times = {}
            for cold in (False, True):
                secs = []
                for box in boxes:
                    if cold:
                        fd = os.open(path, os.O_RDONLY)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
                    t = time.perf_counter()
                    read(box)
                    secs.append(time.perf_counter() - t)
                times["cold" if cold else "warm"] = 1000 * statistics.median(secs)
            rows.append({"section": "store_format", "name": name, "shape": list(vol.shape), "crop": crop,
                         "reads": reads, "bytes": path.stat().st_size, "write_seconds": write,
                         "crop_ms_warm": times["warm"], "crop_ms_cold": times["cold"]})  # fmt: skip
            log(f"store format: {name}: {path.stat().st_size / 2**20:.1f} MiB, crop {times['warm']:.2f} ms warm, {times['cold']:.2f} ms cold")  # fmt: skip
    if blosc2 is None:
        rows.append({"section": "store_format", "name": "blosc2", "status": "not installed"})
    base = rows[0]["bytes"]
    for row in rows:
        if "bytes" in row:
            row["size_vs_npy"] = row["bytes"] / base
    return rows


def startup_markdown(rows: list[dict]) -> list[str]:
    """The start-up and store-format tables (markdown lines) for docs/benchmarks.md."""
    lines = []
    start = [r for r in rows if r["section"] == "startup"]
    if start:
        r0 = start[0]
        lines += ["", f"Start-up, {r0['volumes']} volumes of 24x24x20 (32^3 after padding); "
                  f"`python -c \"import byol3d.training.pretrain\"` alone: {r0['python_import_seconds']:.1f} s",  # fmt: skip
                  "", "| start-up | data.cache | first run s | later runs s (median) | all runs s | on disk / in RAM MiB |",  # fmt: skip
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in start:
            later = "-" if r["seconds_later"] is None else f"{r['seconds_later']:.1f}"
            runs = ", ".join(f"{s:.1f}" for s in r["seconds_all"])
            lines.append(f"| {r['name']} | {r['cache']} | {r['seconds_first']:.1f} | {later} | {runs} | {r['bytes'] / 2**20:.1f} |")  # fmt: skip
    fmt = [r for r in rows if r["section"] == "store_format" and "bytes" in r]
    if fmt:
        lines += ["", f"| store format ({fmt[0]['shape']} float16, {fmt[0]['crop']}^3 crops) | MiB | vs npy | write s | crop ms warm | crop ms cold |",  # fmt: skip
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in fmt:
            lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['size_vs_npy']:.2f} | {r['write_seconds']:.2f} | {r['crop_ms_warm']:.2f} | {r['crop_ms_cold']:.2f} |")  # fmt: skip
    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["--first-step"]:
    _first_step(sys.argv[2], sys.argv[3:])
