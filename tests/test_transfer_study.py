from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow
def test_quick_study_writes_every_table_into_the_doc(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("transfer_study", SCRIPTS / "transfer_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    doc = tmp_path / "evaluation.md"
    doc.write_text(
        "# Evaluation\n\n<!-- study:start -->\nstale section text\n<!-- study:end -->\n\ntail\n"
    )
    assert study.main(["--output", str(tmp_path / "study"), "--quick", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "stale section text" not in text and text.endswith("tail\n")
    assert "Frozen dense probe" in text and "variant - scratch" in text
    assert "| global+dense - global |" in text and "Test Dice along fine-tuning" in text
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    del sys.modules["finetune_segmentation"]
