"""scripts/bench_views.py's 2D frame rows on a tiny frame: the row contract (no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_frame_view_costs_give_three_sides_with_paired_ratios(capsys):
    sys.path.insert(0, str(SCRIPTS))
    from bench_views import main

    rows = main(["--frames", "--shape", "40", "36", "--rois", "16", "--batch", "2", "--repeats", "2"])  # fmt: skip
    names = [r["name"] for r in rows]
    assert names == ["frame_views", "batched_device_frame_views", "batched_cpu_frame_views"]
    for r in rows:
        assert r["section"] == "frame_views" and r["roi"] == 16 and r["volume"] == [40, 36]
        assert len(r["cpu_s_per_sample"]) == 2 and r["cpu_ms_per_sample"] > 0
        assert r["vs_monai"]["n"] == 2 and len(r["vs_monai"]["ci"]) == 2
    assert rows[0]["vs_monai"]["ratio"] == 1.0
    assert "| batched_cpu_frame_views | 16 |" in capsys.readouterr().out
