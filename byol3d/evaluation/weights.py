"""Encoder weights: read them from a run or a file, say what they are, check they fit.

Every way byol3d hands weights to another network goes through here: :func:`read_encoder_state`
(a run directory, ``encoder.pt``, a training checkpoint, an exported file, nnU-Net's
``{"network_weights": ...}``), :func:`describe_weights` (the architecture, read from the
tensors' names and shapes: a MONAI ResNet, SwinUNETR's swinViT, SegResNet's encoder, nnU-Net's
encoder) and :func:`check_state`, which raises one line naming both architectures, or the
first key or shape that does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.networks.nets.resnet import resnet_params

from byol3d.errors import CheckpointError
from byol3d.rundir import latest_checkpoint, load_checkpoint

# wrappers removed when every key starts with one (longest first)
KNOWN_PREFIXES = ("online_encoder.net.", "_orig_mod.", "module.", "encoder.", "net.")


@dataclass(frozen=True)
class Architecture:
    """What a ResNet encoder state_dict is: depth, dimensions, input channels, normalisation."""

    name: str
    spatial_dims: int
    in_channels: int
    norm: str  # "batch", or "group/instance" (the two cannot be told apart from the weights)

    def __str__(self) -> str:
        channels = "channel" if self.in_channels == 1 else "channels"
        return (
            f"{self.name} ({self.spatial_dims}D, {self.in_channels} {channels}, {self.norm} norm)"
        )


@dataclass(frozen=True)
class LoadReport:
    """How a load went: every key of the target loaded, from which file, of which architecture.

    ``architecture`` is the :class:`Architecture` of a ResNet (None for the other encoders);
    ``description`` says what any encoder is (:func:`describe_weights`).
    """

    loaded: int
    total: int
    source: Path
    architecture: Architecture | None
    description: str = ""

    def __str__(self) -> str:
        what = self.description or str(self.architecture)
        return f"loaded {self.loaded}/{self.total} keys of a {what} encoder from {self.source}"


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefixes in :data:`KNOWN_PREFIXES` shared by every key, repeatedly.

    A prefix is removed only when ALL keys carry it, so a state_dict of a whole network
    (``encoder.*`` plus ``decoder.*``) is left alone and fails the later key check instead.

    >>> list(strip_prefixes({"module.encoder.conv1.weight": torch.zeros(1)}))
    ['conv1.weight']
    """
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
                break
    return state


def _online_encoder(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online encoder's keys of a BYOL model state (``online_encoder.net.*``)."""
    state = strip_prefixes({k: v for k, v in model_state.items()})  # "module." of DDP
    prefix = "online_encoder.net."
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return picked or state


def _network_encoder(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` keys of a whole nnU-Net network's state_dict (else all of them)."""
    picked = {k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")}
    return picked or strip_prefixes(weights)


def read_encoder_state(
    source: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """The encoder weights (and the run config, when known) of a run dir or weight file.

    Args:
        source: a run directory (its ``encoder.pt``, else its latest checkpoint), a training
            checkpoint (``{"model": ..., "config": ...}``: the online encoder is taken), an
            ``encoder.pt`` or an exported file (a plain state_dict), a file holding
            ``{"state_dict": ...}``, or an nnU-Net checkpoint (``{"network_weights": ...}``:
            its ``encoder.*`` keys). Read with ``torch.load(..., weights_only=True)``.

    Returns:
        ``(state, config, path)``: the state_dict with wrapper prefixes removed, the nested
        config (from a training checkpoint, else a ``config.yaml`` in the file's folder or
        the run directory above ``checkpoints/``; None when there is none) and the file read.

    Raises:
        CheckpointError: a missing or unreadable file, or a run directory without weights.
    """
    path = Path(source)
    if path.is_dir():
        run_dir = path
        path = path / "encoder.pt"
        if not path.is_file():
            path = latest_checkpoint(run_dir)
            if path is None:
                raise CheckpointError(
                    f"run directory {str(run_dir)!r} has no encoder.pt and no checkpoints/checkpoint_*.pt"
                )
    obj = load_checkpoint(path)
    config = None
    if isinstance(obj, Mapping) and isinstance(obj.get("network_weights"), Mapping):
        state = _network_encoder(obj["network_weights"])  # nnU-Net's checkpoint format
        if isinstance(obj.get("byol3d_config"), Mapping):
            config = obj["byol3d_config"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state, config = _online_encoder(obj["model"]), obj.get("config")
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = strip_prefixes(obj["state_dict"])
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = strip_prefixes(obj)
    else:
        raise CheckpointError(
            f"{str(path)!r} holds no encoder state_dict (expected tensors by name, or a "
            "training checkpoint with 'model')"
        )
    if not state:
        raise CheckpointError(f"{str(path)!r} holds an empty state_dict")
    if config is None:
        for folder in (path.parent, path.parent.parent):
            if (folder / "config.yaml").is_file():
                config = yaml.safe_load((folder / "config.yaml").read_text())
                break
    return state, config, path


def infer_architecture(state: Mapping[str, torch.Tensor]) -> Architecture | None:
    """Depth, spatial dims, channels and norm of a MONAI ResNet encoder state_dict, or None.

    Read from the shapes: ``conv1.weight`` is ``(64, in_channels, k, k[, k])``; the block
    type from ``layer1.0.conv3`` (bottleneck) and the depth from the number of blocks per
    layer, matched against ``monai.networks.nets.resnet.resnet_params``.

    >>> from byol3d.models.encoders import build_encoder
    >>> str(infer_architecture(build_encoder("resnet18", 2, 3).state_dict()))
    'resnet18 (2D, 3 channels, batch norm)'
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim not in (4, 5):
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    layers = []
    for i in range(1, 5):
        blocks = {k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}
        layers.append(len(blocks))
    name = next(
        (n for n, p in resnet_params.items() if p[0] == block and list(p[1]) == layers),
        f"unknown ResNet ({block} blocks {layers})",
    )
    norm = "batch" if any(k.endswith("running_mean") for k in state) else "group/instance"
    return Architecture(name, conv1.ndim - 2, int(conv1.shape[1]), norm)


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """Distinct values of the ``(\\d+)`` group of ``pattern`` matched at the start of the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _io(weight: torch.Tensor) -> str:
    channels = int(weight.shape[1])
    return f"{weight.ndim - 2}D, {channels} channel{'s' if channels != 1 else ''}"


def describe_weights(state: Mapping[str, torch.Tensor]) -> str | None:
    """What an encoder state_dict is, read from its keys and shapes; None when unknown.

    >>> from byol3d.models.encoders import build_encoder
    >>> describe_weights(build_encoder("segresnet", 3, 1).state_dict())
    'segresnet (init_filters 8, blocks_down [1, 2, 2, 4], 3D, 1 channel)'
    """
    arch = infer_architecture(state)
    if arch is not None:
        return str(arch)
    if "patch_embed.proj.weight" in state:
        w = state["patch_embed.proj.weight"]
        depths = [_count(state, rf"layers{k}\.0\.blocks\.(\d+)\.") for k in range(1, 5)]
        return f"swin_unetr (feature_size {int(w.shape[0])}, depths {depths}, {_io(w)})"
    if "convInit.conv.weight" in state:
        w = state["convInit.conv.weight"]
        levels = _count(state, r"down_layers\.(\d+)\.")
        blocks = [_count(state, rf"down_layers\.{k}\.(\d+)\.conv1\.") for k in range(levels)]
        return f"segresnet (init_filters {int(w.shape[0])}, blocks_down {blocks}, {_io(w)})"
    stages = _count(state, r"stages\.(\d+)\.")
    if stages:
        convs = [
            k for k in state if k.endswith("conv.weight") and k.startswith(("stem.", "stages."))
        ]
        first = state[convs[0]] if convs else next(iter(state.values()))
        widths = []
        for s in range(stages):
            key = next((k for k in convs if k.startswith(f"stages.{s}.")), None)
            widths.append(int(state[key].shape[0]) if key else 0)
        kind = "residual" if any(k.startswith("stem.") for k in state) else "plain-conv"
        return f"nnU-Net {kind} encoder ({stages} stages, features {widths}, {_io(first)})"
    return None


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    return describe_weights(state) or "not an encoder byol3d knows"


def check_state(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source: str | Path,
    target_name: str,
) -> None:
    """Raise a one-line CheckpointError unless ``state`` fits ``target`` key for key, shape for shape.

    A different architecture is named as such (both architectures in the message); within
    the same architecture the first missing, unexpected or mis-shaped key is named.
    """
    src_arch, dst_arch = describe_weights(state), describe_weights(target)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if not (missing or unexpected or shapes):
        return
    where = f"the weights in {str(source)!r}"
    if src_arch is None:
        first = next(iter(state), None)
        raise CheckpointError(
            f"{where} are no encoder byol3d knows (first key {first!r}) "
            f"and do not fit {target_name}; the prefixes {', '.join(KNOWN_PREFIXES)} are removed "
            "automatically, any other must be removed by hand"
        )
    if src_arch != dst_arch:
        hint = ""
        src_res, dst_res = infer_architecture(state), infer_architecture(target)
        if src_res is not None and dst_res is not None and src_res.name != dst_res.name:
            hint = f"; build the network with backbone={src_res.name!r}"
        elif src_res is not None and dst_res is not None and src_res.norm != dst_res.norm:
            hint = "; only a model.norm=batch run loads into FlexibleUNet's batch-norm encoder"
        elif dst_arch is not None:
            hint = "; build the network with the run's settings (byol3d export writes them to FILE.json)"
        raise CheckpointError(
            f"{where} are a {_describe(state)} encoder but {target_name} is a "
            f"{_describe(target)} encoder{hint}"
        )
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"{where} do not fit {target_name}: key {k!r} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(target[k].shape)}"
        )
    parts = []
    if unexpected:
        parts.append(f"unexpected key {unexpected[0]!r}")
    if missing:
        parts.append(f"missing key {missing[0]!r}")
    extra = len(missing) + len(unexpected) - len(parts)
    more = f" (and {extra} more)" if extra > 0 else ""
    raise CheckpointError(
        f"{where} do not fit {target_name} ({_describe(target)}): {' and '.join(parts)}{more}"
    )
