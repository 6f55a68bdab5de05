"""The run directory: checkpoints, encoder.pt, logs; reading them back safely.

    OUTPUT_DIR/config.yaml                 the resolved config
    OUTPUT_DIR/checkpoints/checkpoint_<epoch>.pt
    OUTPUT_DIR/metrics.csv, epochs.csv     per-iteration and per-epoch logs
    OUTPUT_DIR/encoder.pt                  the online encoder's plain state_dict, on CPU

Every write is atomic (a temporary file in the same folder, then ``os.replace``), so a run
killed mid-write leaves the previous file intact. Checkpoints are read with
``torch.load(..., weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byol3d.errors import CheckpointError

_CKPT = re.compile(r"checkpoint_(\d+)\.pt$")


def _checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``checkpoints/checkpoint_<epoch>.pt``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    return sorted(
        (int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := _CKPT.search(p.name))
    )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest epoch in ``output_dir/checkpoints``, or None."""
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a one-line error for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of foreign objects, ...
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def truncate_log(path: Path, iteration: int) -> None:
    """Keep the header and the rows of ``path`` (a CSV with an ``iteration`` column) up to ``iteration``."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    column = lines[0].rstrip("\n").split(",").index("iteration")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.strip() and int(line.split(",")[column]) <= iteration
    ]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def save_encoder(encoder: nn.Module, path: Path) -> None:
    """Write ``encoder``'s state_dict with every tensor on CPU (loads on machines without a GPU)."""
    atomic_save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, path)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (by epoch) in ``output_dir/checkpoints``.

    Runs only after a new checkpoint was written, so a run that fails never removes one.
    """
    found = _checkpoints(output_dir)
    for _epoch, path in found[: max(0, len(found) - keep)]:
        path.unlink(missing_ok=True)
