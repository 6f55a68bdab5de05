"""End-to-end part of scripts/benchmark.py: samples/s from the files to the optimizer step.

Every side trains the same encoder (the step settings of ``setup``) on the same CT volumes,
written once as int16 ``.nii.gz`` files (:func:`bench_data.synth_ct`), with the same
deterministic preprocessing (``ct_preprocess``: load, reorient, resample to ``pixdim``,
window, crop the air, pad), the same view distributions at the same ``roi_size``, the same
batch size and the same number of DataLoader workers:

- ``byol3d_end_to_end``: what ``byol3d pretrain`` runs with ``data.cache: store`` and
  ``transforms.views: batched``: the preprocess-once store (written before the timing, by
  :func:`byol3d.transforms.preprocess_store`; its seconds are in the row as a one-off cost),
  memory-mapped crops, views made per batch (in the workers on a CPU, by ``DeviceViewLoader``
  on a GPU), byol3d's Ignite trainer with its handlers.
- ``monai_tutorial_end_to_end``: the MONAI self-supervised tutorial's pipeline
  (``monai.data.Dataset`` with the whole transform chain per sample: load, preprocess, two
  views by per-sample random transforms; ``monai.data.DataLoader``, its workers kept across
  passes like byol3d's) feeding lightly's BYOL example loop (byol3d's bare loop of the same
  work where lightly is not installed).
- ``monai_cached_end_to_end``: the same with ``monai.data.CacheDataset`` (MONAI's RAM cache
  of everything before the first random transform, filled before the timing): only the
  per-sample views are left in the loop. This is the strict comparison of the view paths.
- ``byol3d_step_only``: byol3d's trainer on batches already in memory (the roof of the rows
  above on this machine).

Each repeat runs one pass of every loader, sides alternating; ratios are paired per repeat.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import synth_ct
from bench_steps import byol3d_bare, byol3d_engine, lightly_loop, make_batches
from bench_views import paired_ratio, time_alternating
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose

from byol3d.config import load_config
from byol3d.data.datasets import build_dataset
from byol3d.training.accel import DeviceViewLoader
from byol3d.training.distributed import make_loader
from byol3d.transforms import build_transforms, preprocess_store
from byol3d.transforms.batched import collate_boxes
from byol3d.transforms.batched_ops import MakeViewsCollate

SETTINGS = {
    "byol3d_end_to_end": "store (memory-mapped crops) + batched views + Ignite trainer",
    "monai_tutorial_end_to_end": "monai Dataset (load + preprocess + per-sample views) + DataLoader",  # fmt: skip
    "monai_cached_end_to_end": "monai CacheDataset (per-sample views) + DataLoader",
    "byol3d_step_only": "byol3d Ignite trainer on batches already in memory",
}


def _config(root: Path, store: Path, size: int, pixdim: float, views: str) -> dict:
    return load_config(None, [
        f"data.root={root}", "data.dicom=false", f"data.cache_dir={store}", "data.cache=store",
        f"transforms.roi_size=[{size},{size},{size}]", f"transforms.pixdim=[{pixdim},{pixdim},{pixdim}]",  # fmt: skip
        f"transforms.views={views}", f"output_dir={store.parent / 'run'}",
    ])  # fmt: skip


def _loaders(tmp: Path, files, setup, pixdim, batch, workers, log) -> tuple[dict, float]:
    """The three loaders over ``files``, and the seconds the store took to write."""
    on_gpu = setup.device.type == "cuda"
    cfg = _config(tmp / "ct", tmp / "store", setup.size, pixdim, "batched")
    preprocess, boxes = build_transforms(cfg)
    start = time.perf_counter()
    preprocess_store(cfg, workers=max(workers, 1), progress=False)
    store_seconds = time.perf_counter() - start
    log(f"end to end: wrote the store of {len(files)} volumes in {store_seconds:.1f} s")
    ours = make_loader(
        build_dataset(files, preprocess, boxes, cache="store", cache_dir=tmp / "store"),
        batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=on_gpu,
        collate_fn=collate_boxes if on_gpu else MakeViewsCollate((setup.size,) * 3),
    )  # fmt: skip
    if on_gpu:
        ours = DeviceViewLoader(ours, (setup.size,) * 3, setup.device)
    preprocess, views = build_transforms({**cfg, "transforms": {**cfg["transforms"], "views": "cpu"}})  # fmt: skip
    chain = Compose([*preprocess.flatten().transforms, *views.flatten().transforms])
    rows = [{"image": f} for f in files]
    # persistent workers on every side: a re-fork per pass costs seconds here, which a real
    # epoch of hundreds of volumes would amortise (the tutorial itself re-forks each epoch)
    kwargs = dict(batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                  pin_memory=on_gpu, persistent_workers=workers > 0)  # fmt: skip
    cached = CacheDataset(rows, transform=chain, num_workers=max(workers, 1), progress=False)
    return {
        "byol3d_end_to_end": ours,
        "monai_tutorial_end_to_end": DataLoader(Dataset(rows, transform=chain), **kwargs),
        "monai_cached_end_to_end": DataLoader(cached, **kwargs),
    }, store_seconds


def run_end_to_end(setup, shape, spacing, pixdim, n_volumes, batch, workers, repeats, has_lightly, log=print):  # fmt: skip
    """Samples/s from the files to the step for each side (rows) and the paired ratios."""
    with tempfile.TemporaryDirectory(prefix="byol3d-e2e-") as tmp:
        tmp = Path(tmp)
        files = synth_ct(tmp / "ct", n_volumes, tuple(shape), tuple(spacing))
        loaders, store_seconds = _loaders(tmp, files, setup, pixdim, batch, workers, log)
        engine, _ = byol3d_engine(setup, "auto", setup.device.type == "cuda")
        peer, _ = lightly_loop(setup) if has_lightly else byol3d_bare(setup, "none", False)
        in_memory = make_batches(setup, n_volumes // batch)
        runs = {
            "byol3d_end_to_end": lambda: engine(loaders["byol3d_end_to_end"]),
            "monai_tutorial_end_to_end": lambda: peer(loaders["monai_tutorial_end_to_end"]),
            "monai_cached_end_to_end": lambda: peer(loaders["monai_cached_end_to_end"]),
            "byol3d_step_only": lambda: engine(in_memory),
        }
        samples = (n_volumes // batch) * batch

        def report(r, order, times):
            log(f"end to end repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {samples / times[n][-1]:.2f}/s" for n in order))  # fmt: skip

        times = time_alternating(runs, repeats, report=report)
    peer_name = "lightly's loop" if has_lightly else "byol3d's bare loop (lightly not installed)"
    rows = []
    for name, secs in times.items():
        per_s = [(n_volumes // batch) * batch / s for s in secs]
        rows.append({"section": "end_to_end", "name": name, "setting": SETTINGS[name] + (f" -> {peer_name}" if name.startswith("monai") else ""),
                     "encoder": setup.encoder, "size": setup.size, "batch": batch,
                     "num_workers": workers, "volume": list(shape), "spacing": list(spacing),
                     "pixdim": pixdim, "device": str(setup.device),
                     "samples_per_s": float(np.median(per_s)), "seconds": secs})  # fmt: skip
    rows[0]["store_seconds"] = store_seconds
    ours = times["byol3d_end_to_end"]
    ratios = {
        "end_to_end_vs_monai_lightly": paired_ratio(times["monai_tutorial_end_to_end"], ours),
        "end_to_end_vs_monai_cached": paired_ratio(times["monai_cached_end_to_end"], ours),
        "end_to_end_vs_step_only": paired_ratio(times["byol3d_step_only"], ours),
    }
    return rows, ratios
