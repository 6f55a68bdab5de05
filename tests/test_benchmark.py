"""scripts/benchmark.py on a tiny configuration: the JSON contract (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

RATIO_KEYS = {
    "step_vs_lightly_matched",
    "step_vs_lightly_defaults",
    "step_vs_byol_pytorch_matched",
    "overhead_vs_bare",
    "data_later_epoch_vs_monai",
    "data_cpu_time_vs_monai_device_views",
    "data_cpu_time_vs_monai_cpu_views",
    "end_to_end_vs_monai_lightly",
    "end_to_end_vs_monai_cached",
    "end_to_end_vs_step_only",
}


def load_benchmark():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed(name):
    return importlib.util.find_spec(name) is not None


def test_tiny_benchmark_writes_the_json_contract(tmp_path):
    bench = load_benchmark()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    bench.main(["--tiny", "--no-switches", "--json", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())
    assert RATIO_KEYS <= set(result["ratios"])
    assert {"cpu", "cores", "device"} <= set(result["machine"])
    assert result["versions"]["torch"] and result["versions"]["monai"]
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("byol3d_fp32", "byol3d_defaults", "bare_defaults", "byol3d_2d_fp32"):
        assert rows[name]["status"] == "ok"
        assert rows[name]["samples_per_s"] > 0 and rows[name]["peak_mem_mib"] > 0
        assert rows[name]["batch"] == 2
    # step ratios are paired per repeat: the geometric mean of the per-repeat time quotients
    pairs = zip(
        rows["byol3d_defaults"]["seconds_per_step"], rows["bare_defaults"]["seconds_per_step"]
    )
    expect = math.exp(
        sum(math.log(a / b) for a, b in pairs) / len(rows["bare_defaults"]["seconds_per_step"])
    )
    assert math.isclose(result["ratios"]["overhead_vs_bare"], expect, rel_tol=1e-3)
    # view-path CPU costs: today's per-sample time over the batched path's, paired per repeat
    views = {(r["name"], r["roi"]): r for r in result["rows"] if r["section"] == "views"}
    cpu = views[("batched_cpu_views", 32)]
    monai = views[("monai_views", 32)]
    assert len(cpu["cpu_s_per_sample"]) == 2 and cpu["cpu_ms_per_sample"] > 0
    pairs = list(zip(monai["cpu_s_per_sample"], cpu["cpu_s_per_sample"]))
    expect = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
    assert math.isclose(result["ratios"]["data_cpu_time_vs_monai_cpu_views"], expect, rel_tol=1e-3)
    lo, hi = result["intervals"]["data_cpu_time_vs_monai_cpu_views"]
    assert lo <= result["ratios"]["data_cpu_time_vs_monai_cpu_views"] <= hi
    e2e = {r["name"]: r for r in result["rows"] if r["section"] == "end_to_end"}
    assert set(e2e) == {"byol3d_end_to_end", "monai_tutorial_end_to_end", "monai_cached_end_to_end", "byol3d_step_only"}  # fmt: skip
    assert all(r["samples_per_s"] > 0 and len(r["seconds"]) == 2 for r in e2e.values())
    assert e2e["byol3d_end_to_end"]["store_seconds"] > 0  # the store is written once, timed apart
    # loader-to-step ratios: the MONAI side's seconds per pass over byol3d's, paired per repeat
    pairs = list(zip(e2e["monai_tutorial_end_to_end"]["seconds"], e2e["byol3d_end_to_end"]["seconds"]))  # fmt: skip
    expect = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
    assert math.isclose(result["ratios"]["end_to_end_vs_monai_lightly"], expect, rel_tol=1e-3)
    data = rows["byol3d_cache"]
    assert len(data["epoch_seconds"]) == 2 and data["volumes_per_s_later_epoch"] > 0
    expect = data["volumes_per_s_later_epoch"] / rows["monai_dataset"]["volumes_per_s_later_epoch"]
    assert math.isclose(result["ratios"]["data_later_epoch_vs_monai"], expect, rel_tol=1e-3)
    # peers: measured when installed, else "not installed" with a null ratio
    for module, row, ratio in (
        ("lightly", "lightly", "step_vs_lightly_matched"),
        ("byol_pytorch", "byol_pytorch_2d", "step_vs_byol_pytorch_matched"),
    ):
        if installed(module):
            assert rows[row]["status"] == "ok" and result["ratios"][ratio] > 0
        else:
            assert rows[row]["status"] == "not installed" and result["ratios"][ratio] is None
    # one BYOL step of resnet10 on 2 x 2 views of 32^3: FLOPs from torch.utils.flop_counter
    assert result["flops"]["step_flops"] > 1e9 and result["flops"]["roof_tflops"] > 0
    # one row per downstream network's encoder, all at the same crop and batch
    nets = [r for r in result["rows"] if r.get("group") == "networks"]
    assert [r["encoder"] for r in nets] == ["resnet10", "segresnet", "swin_unetr", "nnunet"]
    assert {(r["size"], r["batch"]) for r in nets} == {(32, 2)}
    for r in nets:
        if r["encoder"] == "nnunet" and not installed("dynamic_network_architectures"):
            assert r["status"] == "not installed"
        else:
            assert r["status"] == "ok" and r["samples_per_s"] > 0 and r["peak_mem_mib"] > 0
    text = md.read_text()
    assert "| overhead_vs_bare |" in text and "| byol3d_cache |" in text
    assert "| batched_device_views | 32^3 |" in text and "| byol3d_end_to_end |" in text
    # --tiny leaves out the start-up rows (many processes); the store format rows are there
    assert result["startup"] is None and result["ratios"]["store_vs_float32_cache"] is None
    npy = rows["npy_float16_mmap"]
    assert npy["bytes"] >= 2 * 64 * 64 * 48 and npy["crop_ms_warm"] > 0 and npy["size_vs_npy"] == 1


def test_views_only_writes_just_the_view_rows_and_their_ratios(tmp_path):
    bench = load_benchmark()
    out, md = tmp_path / "views.json", tmp_path / "views.md"
    bench.main(["--tiny", "--views-only", "--repeats", "3", "--json", str(out), "--markdown", str(md)])  # fmt: skip
    result = json.loads(out.read_text())
    assert {r["section"] for r in result["rows"]} == {"views"}
    assert {r["name"] for r in result["rows"]} == {"monai_views", "batched_device_views", "batched_cpu_views"}  # fmt: skip
    assert all(len(r["cpu_s_per_sample"]) == 3 for r in result["rows"])
    keys = {"data_cpu_time_vs_monai_device_views", "data_cpu_time_vs_monai_cpu_views"}
    assert set(result["ratios"]) == keys and set(result["intervals"]) == keys
    for key in keys:
        lo, hi = result["intervals"][key]
        assert lo <= result["ratios"][key] <= hi
    assert "| batched_cpu_views | 32^3 |" in md.read_text() and "| group |" not in md.read_text()


@pytest.mark.slow  # a few minutes: nine processes that each import torch and MONAI
def test_startup_rows_write_their_json_contract(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "startup.json"
    bench.main(["--tiny", "--startup-only", "--json", str(out)])
    result = json.loads(out.read_text())
    first_later = result["startup"]["seconds_to_first_step_4"]
    assert first_later["first"] > 0 and first_later["later"] > 0
    rows = {r["name"]: r for r in result["rows"]}
    assert {"startup_ram_cache", "startup_disk_cache", "startup_store"} <= set(rows)
    store, disk = result["startup"]["store_bytes"], result["startup"]["persistent_cache_bytes"]
    assert result["ratios"]["store_vs_float32_cache"] == pytest.approx(store / disk, rel=1e-3)
    # float16 arrays of 4 volumes padded to 32^3, and a float32 cache of the same voxels
    assert store >= 4 * 2 * 32**3 and result["startup"]["float32_voxel_bytes"] == 4 * 4 * 32**3
