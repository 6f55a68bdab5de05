"""View-path part of scripts/benchmark.py: CPU time per sample of the view paths.

**CPU time per sample of two views** (:func:`run_view_cost_benchmark`), on one in-memory
preprocessed volume (float32, as the RAM cache holds it), at each ``roi_size``, in this
thread only (``torch.set_num_threads(1)``, ``time.thread_time``: the CPU seconds of the
work itself, whatever else runs on the machine):

* ``monai_views``: today's per-sample pipeline, :func:`byol3d.transforms.volume_views.view_transforms`;
* ``batched_device_views``: the CPU part of ``transforms.views: batched`` on a GPU: drawing
  and slicing the boxes (:class:`~byol3d.transforms.batched.BoxViewsd`), collating, and on
  a CUDA machine pinning the patches; the views are made on the device;
* ``batched_cpu_views``: the all-CPU fallback: the same, plus
  :func:`~byol3d.transforms.batched_ops.make_views` on the CPU.

Each repeat times every side on the same number of samples, sides alternating; the ratio
is paired per repeat (monai time over the side's) and reported as a geometric mean with a
95% t interval over repeats.

The same for 2D frames (:func:`run_frame_view_cost_benchmark`, one uint8 RGB frame as the
cache holds it): ``frame_views`` (:func:`byol3d.transforms.frames.frame_views`, per
sample), ``batched_device_frame_views`` (:class:`~byol3d.transforms.batched.FrameBoxViewsd`,
collate, pin on CUDA) and ``batched_cpu_frame_views`` (plus ``make_views`` on the CPU).
Standalone: ``python scripts/bench_views.py --frames [--shape 480 400] [--rois 224]
[--batch 16] [--repeats 5]`` prints the rows as a table.

The end-to-end rows (loader to step) are in scripts/bench_e2e.py.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from byol3d.evaluation.stats import paired_difference
from byol3d.transforms.batched import BoxViewsd, FrameBoxViewsd, collate_boxes
from byol3d.transforms.batched_ops import MakeViewsCollate
from byol3d.transforms.frames import frame_views
from byol3d.transforms.volume_views import view_transforms


def paired_ratio(numerators, denominators) -> dict:
    """Geometric mean of per-repeat ratios with a 95% t interval: ``{"ratio", "ci", "n"}``."""
    a = [math.log(x) for x in numerators]
    b = [math.log(x) for x in denominators]
    if len(a) < 2:
        r = math.exp(a[0] - b[0]) if a else None
        return {"ratio": r and round(r, 4), "ci": None, "n": len(a)}
    d = paired_difference(a, b)
    return {
        "ratio": round(math.exp(d.mean_difference), 4),
        "ci": [round(math.exp(d.ci_low), 4), round(math.exp(d.ci_high), 4)],
        "n": len(a),
    }


def _volume(shape, seed=0) -> torch.Tensor:
    """A smooth float32 volume in [0, 1] (the costs do not depend on the content)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[max(2, s // 8) for s in shape], generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]


def _frame(shape, seed=0) -> torch.Tensor:
    """A smooth uint8 RGB frame ``(3, *shape)``, as the frame cache holds it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, *[max(2, s // 16) for s in shape], generator=g)
    return (255 * torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear")[0]).to(torch.uint8)  # fmt: skip


def _sides(per_sample, draw, roi, image, batch, names):
    """The three sides: per-sample views, the CPU part of device views, the all-CPU fallback."""
    make = MakeViewsCollate(roi)
    pin = torch.cuda.is_available()

    def per_sample_views():
        for _ in range(batch):
            per_sample({"image": image})

    def device_views():
        out = collate_boxes([draw({"image": image}) for _ in range(batch)])
        if pin:  # what the DataLoader's pin_memory thread does on a GPU machine
            out = {k: [p.pin_memory() for p in v] if isinstance(v, list) else v for k, v in out.items()}  # fmt: skip
        return out

    def cpu_views():
        return make([draw({"image": image}) for _ in range(batch)])

    for t in (per_sample, draw):
        t.set_random_state(seed=0)
    return dict(zip(names, (per_sample_views, device_views, cpu_views), strict=True))


def time_alternating(runs: dict, repeats: int, clock=time.perf_counter, report=None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of ``clock`` per call of each run, per repeat, after one warm-up call of each.

    The runs alternate (A B C, then C B A, ...) so drift on the machine hits all alike;
    ``report(repeat, order, times)`` is called after each repeat (for a log line).
    """
    for fn in runs.values():
        fn()  # warm-up: workers, allocator, kernels
    times = {name: [] for name in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            start = clock()
            runs[name]()
            times[name].append(clock() - start)
        if report is not None:
            report(r, order, times)
    return times


def _time_sides(sides, batch: int, repeats: int, label: str, log) -> dict[str, list[float]]:
    """CPU seconds per sample of each side (this thread's), per repeat, sides alternating."""

    def report(r, order, times):
        log(f"{label} repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] / batch * 1e3:.1f} ms" for n in order))  # fmt: skip

    times = time_alternating(sides, repeats, clock=time.thread_time, report=report)
    return {name: [t / batch for t in secs] for name, secs in times.items()}


def _view_cost_rows(section, shape, rois, batch, repeats, log, image, sides_at) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for size in rois:
            roi = (size,) * len(shape)
            sides = sides_at(roi, image)
            times = _time_sides(sides, batch, repeats, f"{section} {size}^{len(shape)}", log)
            baseline = times[next(iter(sides))]
            for name, secs in times.items():
                rows.append({"section": section, "name": name, "roi": size, "volume": list(shape),
                             "batch": batch, "cpu_ms_per_sample": 1e3 * float(np.median(secs)),
                             "cpu_s_per_sample": secs, "vs_monai": paired_ratio(baseline, secs)})  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return rows


def run_view_cost_benchmark(shape, rois, batch: int, repeats: int, log=print) -> list[dict]:
    """CPU ms per sample (two views) of each side at each roi; paired ratios vs monai."""
    names = ("monai_views", "batched_device_views", "batched_cpu_views")

    def sides_at(roi, image):
        return _sides(view_transforms(roi_size=roi), BoxViewsd(roi_size=roi), roi, image, batch, names)  # fmt: skip

    return _view_cost_rows("views", shape, rois, batch, repeats, log, _volume(shape), sides_at)


def run_frame_view_cost_benchmark(shape, rois, batch: int, repeats: int, log=print) -> list[dict]:
    """The same for 2D frames: CPU ms per sample (two views); ratios vs the per-sample path."""
    names = ("frame_views", "batched_device_frame_views", "batched_cpu_frame_views")

    def sides_at(roi, image):
        return _sides(frame_views(roi_size=roi), FrameBoxViewsd(roi_size=roi), roi, image, batch, names)  # fmt: skip

    return _view_cost_rows("frame_views", shape, rois, batch, repeats, log, _frame(shape), sides_at)


def main(argv=None) -> list[dict]:
    """``python scripts/bench_views.py [--frames] ...``: the view-cost rows as a markdown table."""
    import argparse

    parser = argparse.ArgumentParser(description="CPU time per sample of the view paths")
    parser.add_argument("--frames", action="store_true", help="2D frames instead of volumes")
    parser.add_argument("--shape", type=int, nargs="+", help="image shape (default 480 400 / 240 170 300)")  # fmt: skip
    parser.add_argument("--rois", type=int, nargs="+", help="view sizes (default 224 / 96 128)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run = run_frame_view_cost_benchmark if args.frames else run_view_cost_benchmark
    shape = args.shape or ([480, 400] if args.frames else [240, 170, 300])
    rois = args.rois or ([224] if args.frames else [96, 128])
    rows = run(tuple(shape), rois, args.batch, args.repeats)
    print("| name | roi | CPU ms per sample, median | vs per-sample [95% CI] |\n|---|---|---|---|")
    for r in rows:
        ratio = r["vs_monai"]
        ci = f" [{ratio['ci'][0]:.2f}-{ratio['ci'][1]:.2f}]" if ratio["ci"] else ""
        print(f"| {r['name']} | {r['roi']} | {r['cpu_ms_per_sample']:.2f} | {ratio['ratio']:.2f}x{ci} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
