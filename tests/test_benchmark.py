"""scripts/benchmark.py on a tiny configuration: the JSON contract (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

RATIO_KEYS = {
    "step_vs_lightly_matched",
    "step_vs_lightly_defaults",
    "step_vs_byol_pytorch_matched",
    "overhead_vs_bare",
    "data_later_epoch_vs_monai",
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
    # the ratios are the rows' quotients, rounded
    expect = rows["bare_defaults"]["samples_per_s"] / rows["byol3d_defaults"]["samples_per_s"]
    assert math.isclose(result["ratios"]["overhead_vs_bare"], expect, rel_tol=1e-3)
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
    text = md.read_text()
    assert "| overhead_vs_bare |" in text and "| byol3d_cache |" in text
