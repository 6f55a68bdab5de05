"""Carry a pretrained encoder into MONAI networks: strict loads, loud errors, one call.

    byol3d export runs/ct --to flexible-unet --output resnet50_byol.pt
    byol3d export runs/ct --to resnet --backbone resnet50 --output resnet50_byol.pt

The written file is a plain ``state_dict`` (CPU tensors, read with
``torch.load(..., weights_only=True)``) with the keys of MONAI's ResNet encoder
(``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...), so that

    net = FlexibleUNet(in_channels=1, out_channels=14, backbone="resnet50", spatial_dims=3)
    net.encoder.load_state_dict(torch.load("resnet50_byol.pt", weights_only=True), strict=True)

loads every key, and ``byol3d.load_into_flexible_unet(net, "runs/ct")`` does the same with
a report. Weights are accepted from a run directory, its ``encoder.pt``, a training
checkpoint (the online encoder is taken) or an exported file. The wrappers that usually stop
pretrained weights from loading are removed when every key carries them (``module.`` from
DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``, ``encoder.``, ``net.``,
``online_encoder.net.``); anything else that does not match, a wrong depth, a 2D/3D or
channel mismatch, a renamed key, is a :class:`~byol3d.errors.CheckpointError` with one line
naming both architectures or the key. Nothing is ever loaded partially.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.networks.nets.resnet import ResNetFeatures, resnet_params
from torch import nn

from byol3d.config import default_config
from byol3d.errors import CheckpointError
from byol3d.models.encoders import build_encoder
from byol3d.rundir import atomic_save, latest_checkpoint, load_checkpoint
from byol3d.transforms import PREPROCESS_KEYS

EXPORT_TARGETS = ("flexible-unet", "resnet")


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
    """How a load went: every key of the target loaded, from which file, of which architecture."""

    loaded: int
    total: int
    source: Path
    architecture: Architecture

    def __str__(self) -> str:
        return f"loaded {self.loaded}/{self.total} keys of a {self.architecture} encoder from {self.source}"


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


def read_encoder_state(
    source: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """The encoder weights (and the run config, when known) of a run dir or weight file.

    Args:
        source: a run directory (its ``encoder.pt``, else its latest checkpoint), a training
            checkpoint (``{"model": ..., "config": ...}``: the online encoder is taken), an
            ``encoder.pt`` or an exported file (a plain state_dict), or a file holding
            ``{"state_dict": ...}``. Read with ``torch.load(..., weights_only=True)``.

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
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
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


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    arch = infer_architecture(state)
    return str(arch) if arch is not None else "not a MONAI ResNet encoder (no conv1.weight)"


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
    src_arch, dst_arch = infer_architecture(state), infer_architecture(target)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if not (missing or unexpected or shapes):
        return
    where = f"the weights in {str(source)!r}"
    if src_arch is None:
        first = next(iter(state), None)
        raise CheckpointError(
            f"{where} are not a MONAI ResNet encoder (no key 'conv1.weight', first key {first!r}) "
            f"and do not fit {target_name}; the prefixes {', '.join(KNOWN_PREFIXES)} are removed "
            "automatically, any other must be removed by hand"
        )
    if src_arch != dst_arch:
        hint = ""
        if src_arch is not None and dst_arch is not None and src_arch.name != dst_arch.name:
            hint = f"; build the network with backbone={src_arch.name!r}"
        elif src_arch is not None and dst_arch is not None and src_arch.norm != dst_arch.norm:
            hint = "; only a model.norm=batch run loads into FlexibleUNet's batch-norm encoder"
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


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source, name) -> int:
    check_state(state, module.state_dict(), source, name)
    module.load_state_dict(state, strict=True)
    return len(state)


def load_into_flexible_unet(net: nn.Module, source: str | Path) -> LoadReport:
    """Load pretrained encoder weights into ``net.encoder`` strictly and say what loaded.

    Args:
        net: a ``monai.networks.nets.FlexibleUNet`` with a ResNet backbone (any module with an
            ``encoder`` attribute whose keys are MONAI ResNet keys).
        source: a run directory, ``encoder.pt``, training checkpoint or exported file.

    Returns:
        A :class:`LoadReport`; ``report.loaded == report.total`` always (else it raised).

    Raises:
        CheckpointError: one line naming both architectures (e.g. a resnet10 run into a
            resnet18 FlexibleUNet) or the first key that does not fit.

    Example:
        >>> from monai.networks.nets import FlexibleUNet
        >>> net = FlexibleUNet(1, 8, backbone="resnet10", spatial_dims=3)   # doctest: +SKIP
        >>> print(load_into_flexible_unet(net, "runs/demo_ct"))            # doctest: +SKIP
        loaded 72/72 keys of a resnet10 (3D, 1 channel, batch norm) encoder from runs/demo_ct/encoder.pt
    """
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise CheckpointError(
            f"{type(net).__name__} has no 'encoder' module; pass a monai FlexibleUNet"
        )
    state, _config, path = read_encoder_state(source)
    target = f"{type(net).__name__}.encoder"
    n = _load_strict(encoder, state, path, target)
    return LoadReport(n, len(encoder.state_dict()), path, infer_architecture(state))


def _target_module(to: str, arch: Architecture) -> tuple[nn.Module, str, str]:
    """The MONAI module a file exported ``to`` must load into, its name, and how to build it."""
    if to == "flexible-unet":
        module = ResNetFeatures(
            arch.name,
            pretrained=False,
            spatial_dims=arch.spatial_dims,
            in_channels=arch.in_channels,
        )
        name = f"FlexibleUNet(backbone={arch.name!r}, spatial_dims={arch.spatial_dims}).encoder"
        code = (
            f"net = FlexibleUNet(in_channels={arch.in_channels}, out_channels=N, "
            f"backbone={arch.name!r}, spatial_dims={arch.spatial_dims})\n"
            "net.encoder.load_state_dict(torch.load(FILE, weights_only=True), strict=True)"
        )
        return module, name, code
    if to == "resnet":
        _block, _layers, shortcut, bias_downsample, _ = resnet_params[arch.name]
        module = build_encoder(arch.name, arch.spatial_dims, arch.in_channels)
        kwargs = (
            f"spatial_dims={arch.spatial_dims}, n_input_channels={arch.in_channels}, "
            f"conv1_t_stride=2, shortcut_type={shortcut!r}, bias_downsample={bias_downsample}, "
            "feed_forward=False"
        )
        code = (
            f"net = monai.networks.nets.{arch.name}({kwargs})\n"
            "net.load_state_dict(torch.load(FILE, weights_only=True), strict=True)  # add your head"
        )
        return module, f"monai.networks.nets.{arch.name}({kwargs})", code
    raise CheckpointError(
        f"invalid export target {to!r}, must be one of {', '.join(EXPORT_TARGETS)}"
    )


def export_encoder(
    source: str | Path,
    output: str | Path,
    to: str = "flexible-unet",
    backbone: str | None = None,
) -> LoadReport:
    """Write the encoder of a run as a state_dict that loads strictly into a MONAI network.

    The weights are loaded strictly into the target network first (built without any
    download), so a file is written only when it is known to load. A JSON sidecar
    ``OUTPUT.json`` records the architecture, the run's preprocessing and the load code.

    Args:
        source: a run directory, ``encoder.pt`` or training checkpoint.
        output: the file to write (parent folders are created).
        to: ``"flexible-unet"`` (``FlexibleUNet(...).encoder``) or ``"resnet"`` (the MONAI
            ResNet factory with ``feed_forward=False`` and FlexibleUNet's encoder settings).
        backbone: the architecture asked for, e.g. ``"resnet50"``; None takes the run's.
            A different one than the weights hold is an error naming both.

    Returns:
        The :class:`LoadReport` of the check load.
    """
    if to not in EXPORT_TARGETS:
        raise CheckpointError(
            f"invalid export target {to!r}, must be one of {', '.join(EXPORT_TARGETS)}"
        )
    state, config, path = read_encoder_state(source)
    arch = infer_architecture(state)
    if arch is None or arch.name not in resnet_params:
        raise CheckpointError(
            f"{str(path)!r} does not hold a MONAI ResNet encoder: {_describe(state)}"
        )
    wanted = backbone or arch.name
    if wanted not in resnet_params:
        raise CheckpointError(
            f"invalid backbone {wanted!r}, must be one of {', '.join(resnet_params)}"
        )
    target_arch = Architecture(wanted, arch.spatial_dims, arch.in_channels, "batch")
    module, target_name, code = _target_module(to, target_arch)
    n = _load_strict(module, state, path, target_name)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, output)
    sidecar = {
        "source": str(path),
        "target": target_name,
        "backbone": arch.name,
        "spatial_dims": arch.spatial_dims,
        "in_channels": arch.in_channels,
        "keys": n,
        "load": code.replace("FILE", repr(str(output))),
    }
    if config:
        defaults = default_config()["transforms"]  # a run from before a key existed: its default
        sidecar["preprocessing"] = {
            k: config.get("transforms", {}).get(k, defaults[k]) for k in PREPROCESS_KEYS
        }
    Path(f"{output}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return LoadReport(n, len(module.state_dict()), path, arch)
