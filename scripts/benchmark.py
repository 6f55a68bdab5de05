"""byol3d vs its peers, side by side in one run: step throughput, overhead, data pipeline, memory.

    make bench ARGS="--quick --json bench.json --markdown bench.md"   # CPU-sized, < 15 min on 2 cores
    make bench ARGS="--json bench.json"                              # full: ResNet-50 3D at 128^3
    python scripts/benchmark.py --tiny --json /tmp/b.json            # seconds; the contract test
    make bench ARGS="--quality --json quality.json --markdown quality.md"   # representation quality
    python scripts/benchmark.py --quick --only-networks              # the per-network rows only
    python scripts/benchmark.py --quick --views-only --repeats 5     # the view-path CPU costs only
    python scripts/benchmark.py --quick --e2e-only --repeats 5       # the end-to-end rows only

``--quality`` trains byol3d's 2D BYOL and lightly's BYOL example loop side by side on tiles of
real photos and compares linear probe and kNN accuracy against random init
(scripts/bench_quality.py); it replaces the speed groups below (``--quick``: 1 seed, 40 steps).

``make bench`` builds .bench-venv (torchvision 0.29.2 with its torch, lightly, byol-pytorch 0.8.2,
byol3d) and runs this script there. In an environment without the peers their rows say "not
installed" and their ratios are null.

What is measured (each group's sides alternate, A B C A B C ..., so drift hits all alike):

1. Training step, 3D: byol3d's Ignite trainer (as ``byol3d pretrain`` wires it) at fp32 and at
   byol3d's defaults (``train.amp=auto``, ``train.channels_last=auto``) vs lightly's BYOL example
   loop on the same encoder; the bare compute of byol3d's step (no engine); the speed switches.
   2D: the same vs byol-pytorch 0.8.2 (2D only: it builds itself with a 2D RGB dry run).
2. Data: volumes/s (two views each) from .nii.gz of plain ``monai.data.Dataset`` vs byol3d's
   cached loader, first and later epochs.
3. Peak memory per configuration: max allocated on GPU; on CPU the process's peak RSS
   (VmHWM, reset between measurements) while that side ran.
4. FLOPs per step (torch.utils.flop_counter), achieved TFLOP/s, the card's dense bf16 peak
   and the roof: the TFLOP/s of the network's largest convolution alone at the same shape.
5. Start-up (scripts/bench_startup.py): seconds from the command to the first training step on
   many small volumes with the RAM cache, the disk cache and the preprocess-once store, first
   and later runs; the store's size against the float32 disk cache; the store's .npy format
   against blosc2. ``--startup-only`` runs just these rows (no peers needed):

    python scripts/benchmark.py --startup-only --json startup.json   # 2,000 volumes, ~3 min
6. End to end (scripts/bench_e2e.py): samples/s from the same .nii.gz files to the optimizer
   step: byol3d (store, batched views, Ignite trainer) against the MONAI tutorial's pipeline
   (``Dataset`` with load, preprocessing and per-sample views, or ``CacheDataset``) feeding
   lightly's loop, and against byol3d's step alone on in-memory batches.
7. Networks: one row per downstream network's encoder (ResNet, SegResNet, SwinUNETR's swinViT,
   nnU-Net's encoder from ``--nnunet-plans``), byol3d's trainer at fp32, same crop and batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import run_data_benchmark  # noqa: E402
from bench_e2e import run_end_to_end  # noqa: E402
from bench_flops import card_peak, conv_roof, largest_conv, step_flops  # noqa: E402
from bench_quality import quality_markdown, run_quality  # noqa: E402
from bench_startup import run_startup_benchmark, startup_markdown, store_format_rows  # noqa: E402
from bench_steps import (  # noqa: E402
    StepSetup,
    byol3d_bare,
    byol3d_engine,
    byol3d_model,
    byol_pytorch_loop,
    lightly_loop,
    make_batches,
)
from bench_views import paired_ratio, run_view_cost_benchmark  # noqa: E402

from byol3d.training.accel import apply_speed_options, memory_format, resolve_channels_last
from byol3d.training.engine import resolve_amp

#: the nnunet row's plans (the small example; --nnunet-plans takes your ResEnc L plans)
NNUNET_PLANS = Path(__file__).resolve().parents[1] / "configs" / "nnunet_resenc_example_plans.json"

PRESETS = {
    # (3D encoder, size, batch), (2D encoder, size, batch), iters, repeats, data settings
    "tiny": dict(
        d3=("resnet10", 32, 2),
        d2=("resnet10", 32, 2),
        networks=(
            32,
            2,
            {
                "resnet10": {},
                "segresnet": {"segresnet_blocks_down": (1, 1, 1)},
                "swin_unetr": {"swin_feature_size": 12, "swin_depths": (1, 1, 1, 1)},
                "nnunet": {},
            },
        ),  # fmt: skip
        iters=1,
        repeats=1,
        heads=(64, 16),
        data=dict(
            n_volumes=2,
            shape=(48, 48, 40),
            spacing=(2.0, 2.0, 2.5),
            pixdim=(2.5, 2.5, 2.5),
            roi_size=(32, 32, 32),
            batch_size=2,
            num_workers=0,
            epochs=2,
        ),
        views=dict(shape=(48, 44, 40), rois=(32,), batch=2, repeats=2),
        e2e=dict(
            encoder="resnet10",
            size=32,
            shape=(40, 40, 36),
            spacing=(1.0, 1.0, 1.0),
            pixdim=1.0,
            n_volumes=4,
            batch=2,
            workers=0,
            repeats=2,
        ),  # fmt: skip
        startup=dict(n_volumes=4, later_runs=1),  # only with --startup-only
        store_format=dict(shape=(64, 64, 48), crop=32, reads=3),
    ),
    "quick": dict(
        d3=("resnet10", 48, 4),
        d2=("resnet18", 96, 8),
        networks=(64, 2, {"resnet10": {}, "segresnet": {}, "swin_unetr": {}, "nnunet": {}}),
        iters=8,
        repeats=5,
        heads=(4096, 256),
        data=dict(
            n_volumes=16,
            shape=(256, 256, 160),
            spacing=(0.8, 0.8, 1.25),
            pixdim=(1.5, 1.5, 1.5),
            roi_size=(48, 48, 48),
            batch_size=2,
            num_workers=2,
            epochs=3,
        ),
        views=dict(shape=(240, 170, 300), rois=(96, 128), batch=4, repeats=3),
        e2e=dict(
            encoder="resnet10",
            size=64,
            shape=(256, 256, 160),
            spacing=(0.8, 0.8, 1.25),
            pixdim=1.5,
            n_volumes=16,
            batch=4,
            workers=2,
            repeats=3,
        ),  # fmt: skip
        startup=dict(n_volumes=2000, later_runs=1),
        store_format=dict(shape=(256, 256, 200), crop=96, reads=30),
    ),
    "full": dict(
        d3=("resnet50", 128, 8),
        d2=("resnet50", 224, 64),
        networks=(128, 2, {"resnet50": {}, "segresnet": {}, "swin_unetr": {}, "nnunet": {}}),
        iters=10,
        repeats=5,
        heads=(4096, 256),
        data=dict(
            n_volumes=16,
            shape=(512, 512, 240),
            spacing=(0.75, 0.75, 1.25),
            pixdim=(1.5, 1.5, 1.5),
            roi_size=(128, 128, 128),
            batch_size=2,
            num_workers=min(8, os.cpu_count() or 1),
            epochs=3,
        ),
        views=dict(shape=(240, 170, 300), rois=(96, 128), batch=8, repeats=5),
        e2e=dict(
            encoder="resnet50",
            size=128,
            shape=(320, 320, 200),
            spacing=(0.8, 0.8, 1.25),
            pixdim=1.5,
            n_volumes=64,
            batch=8,
            workers=min(8, os.cpu_count() or 1),
            repeats=3,
        ),  # fmt: skip
        startup=dict(n_volumes=2000, later_runs=2),
        store_format=dict(shape=(256, 256, 200), crop=128, reads=30),
    ),
}


class PeakMemory:
    """Peak memory since the last reset, in MiB: max allocated on CUDA, else VmHWM (peak RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS (VmHWM) of this process to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 - e.g. torchvision failing to load its operators
        return False


def run_group(title, setup, sides, iters, repeats, mem, log) -> list[dict]:
    """Time each side on the same batches, alternating sides in every repeat."""
    batches = make_batches(setup, iters)
    runners, rows = {}, []
    for name, (factory, info) in sides.items():
        row = {
            "section": "step",
            "group": title,
            "name": name,
            "spatial_dims": setup.spatial_dims,
            "encoder": setup.encoder,
            "size": setup.size,
            "batch": setup.batch,
            "device": str(setup.device),
            **info,
        }
        try:
            run, amp_dtype = factory()
            run(batches[:1])  # warm-up (allocator, oneDNN/cuDNN algorithm choice, compile)
            runners[name] = run
            row.update(
                status="ok", precision=str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
            )
        except ImportError as err:
            row.update(status="not installed", error=str(err))
        except Exception as err:  # noqa: BLE001 - one failing side never hides the others
            row.update(status="failed", error=f"{type(err).__name__}: {err}")
        rows.append(row)
    times = {n: [] for n in runners}
    peaks = {n: 0.0 for n in runners}
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            mem.reset()
            t = time.perf_counter()
            runners[name](batches)
            times[name].append((time.perf_counter() - t) / iters)
            peaks[name] = max(peaks[name], mem.read())
        log(
            f"{title} repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in order)
        )
    for row in rows:
        name = row["name"]
        if name in times:
            per_s = [setup.batch / t for t in times[name]]
            row.update(
                seconds_per_step=times[name],
                samples_per_s=statistics.median(per_s),
                samples_per_s_min=min(per_s),
                samples_per_s_max=max(per_s),
                peak_mem_mib=peaks[name],
            )
    return rows


def flop_rows(setup, amp, mem, log) -> dict:
    """FLOPs per step of byol3d's model and the largest-conv roof at the defaults' precision."""
    channels_last = resolve_channels_last("auto", setup.device)
    model = byol3d_model(setup, channels_last)
    v = make_batches(setup, 1)[0]
    flops = step_flops(model, v["view1"], v["view2"])
    amp_dtype = resolve_amp(amp, setup.device)
    fmt = memory_format(setup.spatial_dims) if channels_last else torch.contiguous_format
    x = torch.cat([v["view1"], v["view2"]]).contiguous(memory_format=fmt)
    conv, shape, conv_flops = largest_conv(model.online_encoder.net, x)
    roof = conv_roof(conv, shape, conv_flops, setup.device, amp_dtype, fmt)
    name, peak = card_peak(setup.device)
    log(
        f"flops: {flops / 1e9:.1f} GFLOP per step; largest conv {conv} on {tuple(shape)}: {roof:.2f} TFLOP/s"
    )
    return {
        "step_flops": flops,
        "per_sample_step_flops": flops / setup.batch,
        "largest_conv": repr(conv),
        "largest_conv_input": list(shape),
        "roof_tflops": roof,
        "device_name": name,
        "bf16_dense_peak_tflops": peak,
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
    }


def _paired(rows, a, b) -> dict:
    """Samples/s of ``a`` over ``b``, paired per repeat (the same batches, sides alternating):
    geometric mean of ``t_b / t_a`` over repeats with a 95% interval."""
    ta = next((r.get("seconds_per_step") for r in rows if r["name"] == a), None)
    tb = next((r.get("seconds_per_step") for r in rows if r["name"] == b), None)
    if not ta or not tb:
        return {"ratio": None, "ci": None, "n": 0}
    return paired_ratio(tb, ta)


#: The view-path ratios (today's CPU time per sample over the side's, at the largest roi).
VIEW_RATIOS = {
    "data_cpu_time_vs_monai_device_views": "batched_device_views",
    "data_cpu_time_vs_monai_cpu_views": "batched_cpu_views",
}


def _views_ratio(rows, side: str) -> dict:
    """Today's per-sample CPU time over ``side``'s at the largest roi measured (128^3 in full
    and quick runs)."""
    views = [r for r in rows if r["section"] == "views" and r["name"] == side]
    if not views:
        return {"ratio": None, "ci": None, "n": 0}
    return max(views, key=lambda r: r["roi"])["vs_monai"]


def _ratio(rows, a, b, key="samples_per_s", inverse=False):
    va = next((r.get(key) for r in rows if r["name"] == a), None)
    vb = next((r.get(key) for r in rows if r["name"] == b), None)
    if not va or not vb:
        return None
    return round(vb / va if inverse else va / vb, 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU-sized run (< 15 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path, help="write the markdown tables here")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--repeats", type=int, help="override the preset's repeats")
    ap.add_argument("--iters", type=int, help="override the preset's steps per repeat")
    ap.add_argument(
        "--compile", action="store_true", help="also time train.compile (slow to build)"
    )
    ap.add_argument("--skip-data", action="store_true", help="skip the file-based data benchmark")
    ap.add_argument("--skip-views", action="store_true", help="skip the view-path CPU costs")
    ap.add_argument(
        "--skip-e2e", action="store_true", help="skip the end-to-end loader-to-step rows"
    )
    ap.add_argument("--no-switches", action="store_true", help="skip the speed-switch rows")
    ap.add_argument("--skip-startup", action="store_true", help="skip the start-up/store rows")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up and store rows")
    ap.add_argument(
        "--views-only", action="store_true", help="only the view-path CPU costs (--repeats: theirs)"
    )
    ap.add_argument(
        "--e2e-only", action="store_true", help="only the end-to-end rows (--repeats: theirs)"
    )
    ap.add_argument(
        "--quality", action="store_true", help="representation quality vs lightly and random init"
    )
    ap.add_argument("--seeds", type=int, help="--quality: seeds (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="--quality: optimizer steps (default 200)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--quality: a byol3d config override for its side (repeatable)",
    )
    ap.add_argument("--work", type=Path, help="--quality: keep the tiles and runs here")
    ap.add_argument(
        "--sides",
        default="byol3d,lightly,random",
        help="--quality: the sides to train and evaluate (comma-separated)",
    )
    ap.add_argument(
        "--only-networks", action="store_true", help="only the per-network rows (any venv)"
    )
    ap.add_argument(
        "--nnunet-plans", type=Path, default=NNUNET_PLANS, help="plans of the nnunet row"
    )
    args = ap.parse_args(argv)
    if args.quality:
        return quality_main(args)
    preset = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    iters, repeats = args.iters or preset["iters"], args.repeats or preset["repeats"]
    hidden, proj = preset["heads"]
    mem = PeakMemory(device)
    log = lambda msg: print(f"[bench] {msg}", flush=True)  # noqa: E731
    has_lightly, has_lucid = _available("lightly"), _available("byol_pytorch")
    started = time.perf_counter()
    if args.startup_only:
        rows, startup = startup_rows(preset, log)
        return write_result(args, device, started, rows, startup_ratios(startup), startup=startup)

    if args.views_only:
        v = preset["views"]
        rows = run_view_cost_benchmark(
            v["shape"], v["rois"], v["batch"], args.repeats or v["repeats"], log
        )
        paired = {k: _views_ratio(rows, side) for k, side in VIEW_RATIOS.items()}
        ratios = {k: p["ratio"] for k, p in paired.items()}
        return write_result(args, device, started, rows, ratios, paired=paired)

    if args.e2e_only:
        rows, paired = end_to_end_rows(preset, device, (hidden, proj), args, has_lightly, log)
        ratios = {k: p["ratio"] for k, p in paired.items()}
        return write_result(args, device, started, rows, ratios, paired=paired)

    if args.only_networks:
        rows = network_rows(preset, device, (hidden, proj), (iters, repeats), args, mem, log)
        return write_result(args, device, started, rows, {})
    enc3, s3, b3 = preset["d3"]
    if device.type == "cpu" and not (args.tiny or args.quick):
        b3 = 2  # ResNet-50 3D at 128^3 on a CPU: the smallest batch that keeps BatchNorm sane
    setup3 = StepSetup(3, enc3, s3, b3, 1, device, hidden, proj)
    log(f"3D: {enc3} at {s3}^3, batch {b3}, {iters} steps x {repeats} repeats on {device}")
    sides3 = {
        "byol3d_fp32": (
            lambda: byol3d_engine(setup3, "none", False),
            {"side": "byol3d", "setting": "matched"},
        ),
        "byol3d_defaults": (
            lambda: byol3d_engine(setup3, "auto", resolve_channels_last("auto", device)),
            {"side": "byol3d", "setting": "defaults"},
        ),
        "bare_defaults": (
            lambda: byol3d_bare(setup3, "auto", resolve_channels_last("auto", device)),
            {"side": "bare compute", "setting": "defaults"},
        ),
        "lightly": (
            lightly_loop_factory(setup3, has_lightly),
            {"side": "lightly", "setting": "matched = its defaults (fp32)"},
        ),
        "switch_bf16": (
            lambda: byol3d_engine(setup3, "bf16", False),
            {"side": "byol3d", "setting": "train.amp=bf16"},
        ),
        "switch_channels_last": (
            lambda: byol3d_engine(setup3, "none", True),
            {"side": "byol3d", "setting": "train.channels_last=on (fp32)"},
        ),
        "switch_checkpointing": (
            lambda: _switch(setup3, activation_checkpointing=True),
            {"side": "byol3d", "setting": "train.activation_checkpointing (fp32)"},
        ),
    }
    if args.no_switches:
        sides3 = {k: v for k, v in sides3.items() if not k.startswith("switch_")}
    if args.compile:
        sides3["switch_compile"] = (
            lambda: _switch(setup3, compile=True),
            {"side": "byol3d", "setting": "train.compile (fp32)"},
        )
    rows = run_group("3D", setup3, sides3, iters, repeats, mem, log)

    enc2, s2, b2 = preset["d2"]
    if device.type == "cpu" and not (args.tiny or args.quick):
        b2 = 8
    setup2 = StepSetup(2, enc2, s2, b2, 3, device, hidden, proj)
    log(f"2D: {enc2} at {s2}^2 RGB, batch {b2}")
    sides2 = {
        "byol3d_2d_fp32": (
            lambda: byol3d_engine(setup2, "none", False),
            {"side": "byol3d", "setting": "matched"},
        ),
        "byol3d_2d_defaults": (
            lambda: byol3d_engine(setup2, "auto", resolve_channels_last("auto", device)),
            {"side": "byol3d", "setting": "defaults"},
        ),
        "byol_pytorch_2d": (
            (lambda: byol_pytorch_loop(setup2)) if has_lucid else _missing("byol_pytorch"),
            {"side": "byol-pytorch 0.8.2", "setting": "matched = its defaults (fp32)"},
        ),
    }
    rows += run_group("2D", setup2, sides2, iters, repeats, mem, log)
    rows += network_rows(preset, device, (hidden, proj), (iters, repeats), args, mem, log)

    flops = flop_rows(setup3, "auto", mem, log)
    for row in rows:
        if row.get("group") == "3D" and row.get("seconds_per_step"):
            row["tflops"] = flops["per_sample_step_flops"] * row["samples_per_s"] / 1e12

    if not args.skip_data:
        rows += run_data_benchmark(
            **preset["data"], peak_rss=PeakMemory(torch.device("cpu")), log=log
        )

    paired = {
        "step_vs_lightly_matched": _paired(rows, "byol3d_fp32", "lightly"),
        "step_vs_lightly_defaults": _paired(rows, "byol3d_defaults", "lightly"),
        "step_vs_byol_pytorch_matched": _paired(rows, "byol3d_2d_fp32", "byol_pytorch_2d"),
        "step_vs_byol_pytorch_defaults": _paired(rows, "byol3d_2d_defaults", "byol_pytorch_2d"),
        "overhead_vs_bare": _paired(rows, "bare_defaults", "byol3d_defaults"),
    }
    if not args.skip_views:
        v = preset["views"]
        rows += run_view_cost_benchmark(v["shape"], v["rois"], v["batch"], v["repeats"], log)
        paired.update({k: _views_ratio(rows, side) for k, side in VIEW_RATIOS.items()})
    if not args.skip_e2e:
        e2e_rows, e2e_ratios = end_to_end_rows(preset, device, (hidden, proj), args, has_lightly, log)  # fmt: skip
        rows += e2e_rows
        paired.update(e2e_ratios)
    ratios = {
        **{k: v["ratio"] for k, v in paired.items()},
        "data_later_epoch_vs_monai": _ratio(
            rows, "byol3d_cache", "monai_dataset", "volumes_per_s_later_epoch"
        ),
        "data_first_epoch_vs_monai": _ratio(
            rows, "byol3d_cache", "monai_dataset", "volumes_per_s_first_epoch"
        ),
    }
    if flops["bf16_dense_peak_tflops"]:
        best = next(r for r in rows if r["name"] == "byol3d_defaults").get("tflops")
        ratios["tflops_vs_bf16_peak"] = best and round(best / flops["bf16_dense_peak_tflops"], 4)
    best = next(r for r in rows if r["name"] == "byol3d_defaults").get("tflops")
    ratios["tflops_vs_conv_roof"] = best and round(best / flops["roof_tflops"], 4)
    startup = None
    if not args.skip_startup and not args.tiny:  # --tiny: seconds; start-up needs many processes
        more, startup = startup_rows(preset, log)
        rows += more
        ratios.update(startup_ratios(startup))
    else:
        rows += store_format_rows(**preset["store_format"], log=log)
        ratios["store_vs_float32_cache"] = None
    return write_result(
        args, device, started, rows, ratios, flops=flops, startup=startup, paired=paired
    )


def end_to_end_rows(preset, device, heads, args, has_lightly, log) -> tuple[list[dict], dict]:
    """The end-to-end rows (scripts/bench_e2e.py) and their paired ratios."""
    e = preset["e2e"]
    setup = StepSetup(3, e["encoder"], e["size"], e["batch"], 1, device, *heads)
    log(f"end to end: {e['encoder']} at {e['size']}^3, batch {e['batch']}, {e['workers']} workers")
    return run_end_to_end(setup, e["shape"], e["spacing"], e["pixdim"], e["n_volumes"], e["batch"],
                          e["workers"], args.repeats or e["repeats"], has_lightly, log)  # fmt: skip


def startup_rows(preset, log) -> tuple[list[dict], dict]:
    """The start-up rows and the store-format rows; the ``startup`` summary."""
    rows, startup = run_startup_benchmark(**preset["startup"], log=log)
    return rows + store_format_rows(**preset["store_format"], log=log), startup


def startup_ratios(startup: dict) -> dict:
    """``store_vs_float32_cache``: the store's bytes over the filled float32 disk cache's."""
    return {
        "store_vs_float32_cache": round(
            startup["store_bytes"] / startup["persistent_cache_bytes"], 4
        )
    }


def write_result(
    args, device, started, rows, ratios, flops=None, startup=None, paired=None
) -> dict:
    """The result dict, printed as markdown and written to ``--json``/``--markdown``."""
    result = {
        "preset": "tiny" if args.tiny else "quick" if args.quick else "full",
        "command": " ".join(sys.argv),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": _machine(device),
        "versions": _versions(),
        "ratios": ratios,
        "intervals": {k: v["ci"] for k, v in (paired or {}).items()},
        "flops": flops,
        "rows": rows,
    }
    result["startup"] = startup  # None when the start-up rows did not run
    text = to_markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(text)
    return result


def quality_main(args) -> dict:
    """``--quality``: scripts/bench_quality.py's comparison, with the machine and versions."""
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    log = lambda msg: print(f"[quality] {msg}", flush=True)  # noqa: E731
    sides = tuple(x.strip() for x in args.sides.split(",") if x.strip())
    result = run_quality(preset, log, seeds=args.seeds, steps=args.steps, sides=sides,
                         overrides=args.overrides, device=device, work=args.work)  # fmt: skip
    result.update(command=" ".join(sys.argv), machine=_machine(torch.device(device)),
                  versions=_versions())  # fmt: skip
    text = f"Machine: {result['machine']}  \nVersions: {result['versions']}\n\n" + quality_markdown(
        result
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(text)
    return result


def network_rows(preset, device, heads, steps, args, mem, log) -> list[dict]:
    """One row per downstream network's encoder, all at one crop size and batch (fp32)."""
    size, batch, networks = preset["networks"]
    base = StepSetup(3, next(iter(networks)), size, batch, 1, device, *heads)
    log(f"networks: {', '.join(networks)} at {size}^3, batch {batch}")
    sides = {}
    for name, arch in networks.items():
        arch = {**arch, "nnunet_plans": str(args.nnunet_plans)} if name == "nnunet" else arch
        setup = dataclasses.replace(base, encoder=name, arch=arch)
        needs = "dynamic_network_architectures" if name == "nnunet" else "torch"
        factory = (
            (lambda s=setup: byol3d_engine(s, "none", False))
            if _available(needs)
            else _missing(needs)
        )
        setting = ", ".join(
            f"{k}={Path(v).name if k == 'nnunet_plans' else v}" for k, v in arch.items()
        )
        sides[f"net_{name}"] = (factory, {"side": "byol3d", "setting": setting or "defaults",
                                          "encoder": name})  # fmt: skip
    return run_group("networks", base, sides, *steps, mem, log)


def lightly_loop_factory(setup, available):
    return (lambda: lightly_loop(setup)) if available else _missing("lightly")


def _missing(module):
    def factory():
        raise ImportError(f"{module} not installed (make bench installs it in .bench-venv)")

    return factory


def _switch(setup, **options):
    """byol3d's engine in fp32 with one more speed switch on."""
    run, amp_dtype = byol3d_engine(setup, "none", False)
    apply_speed_options(run.model, spatial_dims=setup.spatial_dims, **options)
    return run, amp_dtype


def _machine(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "monai",
        "pytorch-ignite",
        "byol3d",
        "lightly",
        "byol-pytorch",
        "torchvision",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def to_markdown(result: dict) -> str:
    """The step, data and ratio tables as markdown (what docs/benchmarks.md shows)."""
    rows = result["rows"]
    lines = [f"Machine: {result['machine']}  ", f"Versions: {result['versions']}"]
    steps = [r for r in rows if r["section"] == "step"]
    if steps:
        lines += [
            "",
            "| group | name | side | setting | precision | encoder, input, batch | samples/s median [min-max] | TFLOP/s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for r in steps:
        shape = f"{r['encoder']}, {r['size']}^{r['spatial_dims']}, {r['batch']}"
        if r.get("status") != "ok":
            lines.append(
                f"| {r['group']} | {r['name']} | {r['side']} | {r['setting']} | - | {shape} | {r['status']} | - | - |"
            )
            continue
        lines.append(
            f"| {r['group']} | {r['name']} | {r['side']} | {r['setting']} | {r['precision']} | {shape} | "
            f"{_fmt(r['samples_per_s'])} [{_fmt(r['samples_per_s_min'])}-{_fmt(r['samples_per_s_max'])}] | "
            f"{_fmt(r.get('tflops'), '.3f')} | {_fmt(r['peak_mem_mib'], '.0f')} |"
        )
    data = [r for r in rows if r["section"] == "data"]
    if data:
        lines += [
            "",
            "| data pipeline | first epoch volumes/s | later epoch volumes/s | epoch seconds | peak RSS MiB |",
            "|---|---|---|---|---|",
        ]
        for r in data:
            secs = ", ".join(f"{s:.1f}" for s in r["epoch_seconds"])
            lines.append(
                f"| {r['name']} | {_fmt(r['volumes_per_s_first_epoch'])} | "
                f"{_fmt(r['volumes_per_s_later_epoch'])} | {secs} | {_fmt(r['peak_mem_mib'], '.0f')} |"
            )
    views = [r for r in rows if r["section"] == "views"]
    if views:
        lines += [
            "",
            "| view path (CPU, one thread) | roi | CPU ms per sample (two views) | monai / this, paired [95% CI] |",
            "|---|---|---|---|",
        ]
        for r in views:
            p = r["vs_monai"]
            ci = f" [{p['ci'][0]:.2f}-{p['ci'][1]:.2f}]" if p["ci"] else ""
            lines.append(
                f"| {r['name']} | {r['roi']}^3 | {r['cpu_ms_per_sample']:.1f} | {_fmt(p['ratio'])}{ci} |"
            )
    e2e = [r for r in rows if r["section"] == "end_to_end"]
    if e2e:
        lines += [
            "",
            "| end to end | setting | encoder, input, batch, workers | samples/s median |",
            "|---|---|---|---|",
        ]
        for r in e2e:
            lines.append(
                f"| {r['name']} | {r['setting']} | {r['encoder']}, {r['size']}^3, {r['batch']}, {r['num_workers']} | {_fmt(r['samples_per_s'])} |"
            )
    lines += startup_markdown(rows)
    f = result["flops"]
    if f:
        lines += [
            "",
            f"FLOPs per step: {f['step_flops'] / 1e9:.1f} GFLOP ({f['precision']}); largest conv "
            f"{f['largest_conv']} on {f['largest_conv_input']}: roof {f['roof_tflops']:.3f} TFLOP/s; "
            f"bf16 dense peak of {f['device_name']}: {f['bf16_dense_peak_tflops'] or 'unknown'}",
        ]
    lines += ["", "| ratio | value | 95% CI (paired over repeats) |", "|---|---|---|"]
    for k, v in result["ratios"].items():
        ci = result.get("intervals", {}).get(k)
        lines.append(f"| {k} | {_fmt(v, '.3f')} | {f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
