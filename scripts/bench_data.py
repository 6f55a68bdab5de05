"""Data-pipeline part of scripts/benchmark.py: byol3d's cached loader vs a plain MONAI pipeline.

Both sides read the same synthetic CT volumes from .nii.gz, run the same deterministic
preprocessing (:func:`byol3d.transforms.ct_preprocess`, with resampling to ``pixdim``) and the
same two random views per volume (:func:`byol3d.transforms.view_transforms`), with the same
DataLoader workers and batch size. The plain side is ``monai.data.Dataset`` (load and
preprocess every volume every epoch); byol3d's side is :func:`byol3d.data.datasets.build_dataset` with
its RAM cache (``cache``) or disk cache (``persistent``). Epochs of the two sides alternate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from byol3d.data.datasets import build_dataset
from byol3d.data.synthetic_ct import make_phantom
from byol3d.training.distributed import make_loader
from byol3d.transforms.ct import ct_preprocess
from byol3d.transforms.volume_views import view_transforms


def synth_ct(folder: Path, n: int, shape: tuple[int, int, int], spacing: tuple, seed: int = 0):
    """``n`` CT-like int16 volumes of ``shape`` at ``spacing`` mm as .nii.gz (phantom + noise).

    A byol3d phantom at a quarter of the resolution is upsampled (trilinear) and given 15 HU of
    noise, so the files decode like real CT (noise limits the gzip ratio) at a fraction of
    the phantom generator's cost.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = tuple(max(16, s // 4) for s in shape)
        coarse = tuple(sp * s / c for sp, s, c in zip(spacing, shape, small))
        ph = make_phantom(seed + i, shape=small, spacing=coarse)
        vol = torch.from_numpy(ph.image.astype(np.float32))[None, None]
        vol = F.interpolate(vol, size=shape, mode="trilinear", align_corners=False)[0, 0]
        vol = vol.numpy() + rng.normal(0, 15, size=shape).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        path = folder / f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(vol, -1024, 3071).astype(np.int16), affine), str(path))
        paths.append(str(path))
    return paths


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += batch["view1"].shape[0]
    return n


def run_data_benchmark(
    n_volumes: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    pixdim: tuple[float, float, float],
    roi_size: tuple[int, int, int],
    batch_size: int,
    num_workers: int,
    epochs: int,
    peak_rss,
    log=print,
) -> list[dict]:
    """Volumes/s per epoch for plain MONAI, byol3d cache=cache and cache=persistent."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="byol3d-bench-") as tmp:
        t = time.perf_counter()
        files = synth_ct(Path(tmp) / "ct", n_volumes, shape, spacing)
        log(
            f"data: wrote {n_volumes} volumes {shape} at {spacing} mm in {time.perf_counter() - t:.0f} s"
        )
        pre = ct_preprocess(roi_size=roi_size, pixdim=pixdim)
        views = view_transforms(roi_size=roi_size)
        sides = {}

        from monai.data import DataLoader, Dataset
        from monai.transforms import Compose

        plain = Dataset([{"image": f} for f in files], transform=Compose([pre, views]))
        sides["monai_dataset"] = lambda: DataLoader(
            plain, batch_size=batch_size, shuffle=True, num_workers=num_workers
        )
        for cache in ("cache", "persistent"):

            def make(cache=cache):
                ds = build_dataset(
                    files,
                    pre,
                    views,
                    cache=cache,
                    cache_dir=str(Path(tmp) / "cache"),
                    num_workers=num_workers,
                    progress=False,
                )
                return make_loader(
                    ds,
                    batch_size,
                    shuffle=True,
                    drop_last=False,
                    num_workers=num_workers,
                    pin_memory=torch.cuda.is_available(),
                )

            sides[f"byol3d_{cache}"] = make
        loaders: dict = {}
        times: dict[str, list[float]] = {k: [] for k in sides}
        peaks: dict[str, float] = {k: 0.0 for k in sides}
        for epoch in range(1, epochs + 1):
            for name, make in sides.items():
                peak_rss.reset()
                t = time.perf_counter()
                if name not in loaders:  # epoch 1 includes building the dataset (filling caches)
                    loaders[name] = make()
                n = _epoch(loaders[name])
                times[name].append(time.perf_counter() - t)
                peaks[name] = max(peaks[name], peak_rss.read())
                log(f"data: {name} epoch {epoch}: {n / times[name][-1]:.2f} volumes/s")
        for name, secs in times.items():
            rows.append(
                {
                    "section": "data",
                    "name": name,
                    "volumes": n_volumes,
                    "shape": list(shape),
                    "spacing_mm": list(spacing),
                    "pixdim_mm": list(pixdim),
                    "roi_size": list(roi_size),
                    "batch": batch_size,
                    "num_workers": num_workers,
                    "epoch_seconds": secs,
                    "volumes_per_s_first_epoch": n_volumes / secs[0],
                    "volumes_per_s_later_epoch": n_volumes / float(np.median(secs[1:]))
                    if len(secs) > 1
                    else None,
                    "peak_mem_mib": peaks[name],
                }
            )
    return rows
