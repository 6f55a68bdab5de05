"""Carry a pretrained encoder into the network you fine-tune: strict loads, loud errors, one call.

    byol3d export runs/ct --to flexible-unet --output resnet50_byol.pt
    byol3d export runs/ct --to resnet --backbone resnet50 --output resnet50_byol.pt
    byol3d export runs/ct_swin --to swin-unetr --output swin_byol.pt
    byol3d export runs/ct_segresnet --to segresnet --output segresnet_byol.pt
    byol3d export runs/ct_nnunet --to nnunet --output nnunet_byol.pth

What each target writes (always after loading it into the target network, built here without
any download, so a file is written only when it is known to load; ``FILE.json`` beside it
records the architecture, the run's preprocessing and the load code):

* ``flexible-unet`` / ``resnet``: a plain ``state_dict`` with MONAI ResNet's keys, loading with
  ``strict=True`` into ``FlexibleUNet(backbone=...).encoder`` or the MONAI ResNet factory;
* ``swin-unetr``: ``SwinUNETR(...).swinViT``'s state_dict (strict), for a SwinUNETR built
  with the run's ``model.swin_feature_size`` and ``model.swin_depths``;
* ``segresnet``: the ``convInit.*`` and ``down_layers.*`` keys of ``SegResNet(...)`` built with
  the run's ``model.segresnet_init_filters`` and ``model.segresnet_blocks_down`` (every
  encoder key of the network, nothing else);
* ``nnunet``: an nnU-Net checkpoint, ``{"network_weights": ...}`` of the WHOLE network built
  from the run's plans: BYOL's encoder plus the decoder at nnU-Net's initialisation, because
  nnU-Net 2.8's ``load_pretrained_weights`` (``nnUNetv2_train ... -pretrained_weights FILE``)
  asserts that every key but the ``.seg_layers.`` is present with its shape.

:func:`load_into` loads a run (or any exported file) into FlexibleUNet, SwinUNETR, SegResNet,
nnU-Net's network or a bare encoder and checks every encoder tensor; weights are accepted from
a run directory, its ``encoder.pt``, a training checkpoint (the online encoder), an exported
file or an nnU-Net checkpoint. The wrappers that usually stop pretrained weights from loading
are removed when every key carries them (``module.``, ``_orig_mod.``, ``encoder.``, ``net.``,
``online_encoder.net.``); anything else that does not match, another architecture, other
plans, a 2D/3D or channel mismatch, a renamed key, is a :class:`~byol3d.errors.CheckpointError`
with one line naming both sides or the key. Nothing is ever loaded partially.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import FlexibleUNet, SegResNet, SwinUNETR
from monai.networks.nets.resnet import ResNet, ResNetFeatures, resnet_params
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from byol3d.config import default_config
from byol3d.errors import CheckpointError
from byol3d.evaluation.weights import (
    KNOWN_PREFIXES,
    Architecture,
    LoadReport,
    check_state,
    describe_weights,
    infer_architecture,
    read_encoder_state,
    strip_prefixes,
)
from byol3d.models.encoders import ARCH_DEFAULTS, RESNETS, build_encoder
from byol3d.models.monai_encoders import SWIN_HEADS, SegResNetEncoder
from byol3d.models.nnunet import NnUNetEncoder, NnUNetNetwork, build_nnunet_network, read_plans
from byol3d.rundir import atomic_save
from byol3d.transforms import PREPROCESS_KEYS

__all__ = [
    "EXPORT_TARGETS",
    "KNOWN_PREFIXES",
    "LoadReport",
    "build_downstream",
    "build_segmentation_net",
    "check_state",
    "encoder_modules",
    "export_encoder",
    "infer_architecture",
    "load_into",
    "load_into_flexible_unet",
    "read_encoder_state",
    "strip_prefixes",
]

EXPORT_TARGETS = ("flexible-unet", "resnet", "nnunet", "swin-unetr", "segresnet")
#: model.encoder -> the export target of its downstream network
DOWNSTREAM = {"nnunet": "nnunet", "swin_unetr": "swin-unetr", "segresnet": "segresnet"}
SEGRESNET_KEYS = ("convInit.", "down_layers.")
ENCODER_TYPES = (ResNet, SwinTransformer, SegResNetEncoder, NnUNetEncoder)


def describe(state: Mapping[str, torch.Tensor]) -> str:
    return describe_weights(state) or "unknown"


def _target_for(state: Mapping[str, torch.Tensor]) -> str:
    text = describe(state)
    for prefix, target in (
        ("swin", "swin-unetr"),
        ("segresnet", "segresnet"),
        ("nnU-Net", "nnunet"),
    ):
        if text.startswith(prefix):
            return target
    return "flexible-unet"


def _encoder_part(net: nn.Module) -> tuple[nn.Module, tuple[str, ...] | None, str]:
    """The module holding ``net``'s encoder, the key prefixes that are its encoder, its name."""
    name = type(net).__name__
    if isinstance(net, SwinUNETR):
        return net.swinViT, None, "SwinUNETR.swinViT"
    if isinstance(net, SegResNet):
        return net, SEGRESNET_KEYS, "SegResNet's encoder (convInit, down_layers)"
    if isinstance(net, ENCODER_TYPES):
        return net, None, name
    if isinstance(net, NnUNetNetwork):
        return net.encoder, None, f"{type(net.network).__name__}.encoder"
    encoder = getattr(net, "encoder", None)
    if isinstance(encoder, nn.Module):  # FlexibleUNet, nnU-Net's networks
        return encoder, None, f"{name}.encoder"
    raise CheckpointError(
        f"{name} has no encoder byol3d can load into; pass a FlexibleUNet, SwinUNETR, "
        "SegResNet, nnU-Net's network (ResidualEncoderUNet, PlainConvUNet) or an encoder"
    )


def encoder_modules(net: nn.Module) -> list[nn.Module]:
    """The modules that make up ``net``'s encoder (what :func:`load_into` fills).

    ``[net.encoder]`` for FlexibleUNet and nnU-Net's networks, ``[net.swinViT]`` for
    SwinUNETR, ``[net.convInit, net.down_layers]`` for SegResNet; for a separate learning rate
    or freezing the encoder in fine-tuning.
    """
    if isinstance(net, SegResNet):
        return [net.convInit, net.down_layers]
    return [_encoder_part(net)[0]]


def _load_checked(
    net: nn.Module, state: Mapping[str, torch.Tensor], source: Path, name: str | None = None
) -> tuple[int, int]:
    """Check ``state`` against ``net``'s encoder key for key, then load it; (loaded, total)."""
    module, prefixes, part = _encoder_part(net)
    full = module.state_dict()
    target = full if prefixes is None else {k: v for k, v in full.items() if k.startswith(prefixes)}
    check_state(state, target, source, name or part)
    module.load_state_dict(state, strict=prefixes is None)  # checked: nothing else is left out
    return len(state), len(target)


def load_into(net: nn.Module, source: str | Path) -> LoadReport:
    """Load pretrained encoder weights into ``net``'s encoder, verified key for key, shape for shape.

    Args:
        net: ``monai.networks.nets.FlexibleUNet`` (into ``net.encoder``), ``SwinUNETR`` (into
            ``net.swinViT``), ``SegResNet`` (its ``convInit`` and ``down_layers``), nnU-Net's
            ``ResidualEncoderUNet`` / ``PlainConvUNet`` (into ``net.encoder``), or a bare
            encoder (MONAI ResNet, byol3d's encoders).
        source: a run directory, ``encoder.pt``, training checkpoint, exported file or nnU-Net
            checkpoint written by ``byol3d export --to nnunet``.

    Returns:
        A :class:`LoadReport`; ``report.loaded == report.total``: every tensor of the encoder
        came from ``source`` (else it raised, and ``net`` is unchanged).

    Raises:
        CheckpointError: one line naming both architectures (another network, other plans,
            another channel count) or the first key that does not fit.

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48)   # doctest: +SKIP
        >>> print(byol3d.load_into(net, "runs/ct_swin"))                       # doctest: +SKIP
        loaded 158/158 keys of a swin_unetr (feature_size 48, ...) encoder from runs/ct_swin/encoder.pt
    """
    _encoder_part(net)  # a network without an encoder fails before any file is read
    state, _config, path = read_encoder_state(source)
    n, total = _load_checked(net, state, path)
    return LoadReport(n, total, path, infer_architecture(state), describe(state))


def load_into_flexible_unet(net: nn.Module, source: str | Path) -> LoadReport:
    """:func:`load_into` for a ``FlexibleUNet`` (kept for existing code): into ``net.encoder``.

    Raises:
        CheckpointError: ``net`` has no ``encoder`` module, or the weights do not fit it (one
            line naming both architectures, e.g. a resnet10 run into a resnet18 FlexibleUNet).
    """
    if not isinstance(getattr(net, "encoder", None), nn.Module):
        raise CheckpointError(
            f"{type(net).__name__} has no 'encoder' module; pass a monai FlexibleUNet"
        )
    return load_into(net, source)


def _model_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    model = dict(ARCH_DEFAULTS)
    model.update((config or {}).get("model", {}))
    return model


def build_downstream(
    to: str,
    model: Mapping[str, Any],
    spatial_dims: int,
    in_channels: int,
    num_classes: int = 2,
    decoder_channels: tuple[int, ...] | None = None,
) -> tuple[nn.Module, str, str]:
    """The segmentation network ``to`` for a run's ``model`` settings, its name and load code.

    Args:
        to: ``flexible-unet``, ``swin-unetr``, ``segresnet`` or ``nnunet``.
        model: the run's ``model`` section (``encoder``, ``swin_*``, ``segresnet_*``,
            ``nnunet_plans``, ``nnunet_configuration``).
        spatial_dims, in_channels, num_classes: the network's input and output.
        decoder_channels: FlexibleUNet's ``decoder_channels`` (None: MONAI's default).
    """
    if to == "swin-unetr":
        feature, depths = int(model["swin_feature_size"]), tuple(model["swin_depths"])
        net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature,
                        depths=depths, num_heads=SWIN_HEADS, spatial_dims=spatial_dims)  # fmt: skip
        args = f"feature_size={feature}, depths={depths}, spatial_dims={spatial_dims}"
        code = (f"net = SwinUNETR(in_channels={in_channels}, out_channels=N, {args})\n"
                "net.swinViT.load_state_dict(torch.load(FILE, weights_only=True), strict=True)")  # fmt: skip
        return net, f"SwinUNETR({args}).swinViT", code
    if to == "segresnet":
        filters, blocks = (
            int(model["segresnet_init_filters"]),
            tuple(model["segresnet_blocks_down"]),
        )
        net = SegResNet(spatial_dims=spatial_dims, init_filters=filters, in_channels=in_channels,
                        out_channels=num_classes, blocks_down=blocks,
                        blocks_up=(1,) * (len(blocks) - 1))  # fmt: skip
        args = f"init_filters={filters}, blocks_down={blocks}, spatial_dims={spatial_dims}"
        code = (f"net = SegResNet(in_channels={in_channels}, out_channels=N, {args})\n"
                "byol3d.load_into(net, FILE)  # or: net.load_state_dict(torch.load(FILE), strict=False)")  # fmt: skip
        return net, f"SegResNet({args})'s encoder", code
    if to == "nnunet":
        plans, configuration = model["nnunet_plans"], model["nnunet_configuration"]
        if not plans:
            raise CheckpointError(
                "export --to nnunet needs the plans: --plans FILE (or a run with model.nnunet_plans)"
            )
        try:
            plan = read_plans(plans, configuration)
            net = build_nnunet_network(plan, in_channels, num_classes)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        name = f"the network of nnU-Net plans {str(plans)!r} ({configuration})"
        code = f"nnUNetv2_train DATASET {configuration} FOLD -p {Path(plans).stem} -pretrained_weights FILE"
        return net, name, code
    if to == "flexible-unet":
        name = model["encoder"] if model["encoder"] in RESNETS else "resnet50"
        extra = {} if decoder_channels is None else {"decoder_channels": decoder_channels}
        net = FlexibleUNet(in_channels, num_classes, backbone=name, spatial_dims=spatial_dims,
                           pretrained=False, **extra)  # fmt: skip
        return net, f"FlexibleUNet(backbone={name!r}, spatial_dims={spatial_dims}).encoder", ""
    raise CheckpointError(
        f"invalid export target {to!r}, must be one of {', '.join(EXPORT_TARGETS)}"
    )


def build_segmentation_net(enc: Any, n_labels: int, decoder_channels=None) -> nn.Module:
    """The network that fine-tunes ``enc``'s encoder: FlexibleUNet for ResNets, else its own.

    Args:
        enc: a :class:`byol3d.evaluation.features.LoadedEncoder` (``name``, ``config``,
            ``spatial_dims``, ``in_channels``).
        n_labels: output channels (background included).
        decoder_channels: FlexibleUNet's decoder widths (ResNets only).

    Returns:
        ``FlexibleUNet``, ``SwinUNETR``, ``SegResNet``, or nnU-Net's network of the run's plans
        (without deep supervision) in a :class:`~byol3d.models.nnunet.NnUNetNetwork`, which
        takes byol3d's ``(x, y, z)`` volumes; randomly initialised, :func:`load_into` fills
        the encoder.
    """
    to = DOWNSTREAM.get(enc.name, "flexible-unet")
    model = _model_settings(enc.config)
    if to == "nnunet":
        plan = read_plans(model["nnunet_plans"], model["nnunet_configuration"])
        network = build_nnunet_network(plan, enc.in_channels, n_labels, deep_supervision=False)
        return NnUNetNetwork(network, plan)
    net, _name, _code = build_downstream(to, model, enc.spatial_dims, enc.in_channels, n_labels,
                                         decoder_channels)  # fmt: skip
    return net


def _write_sidecar(output: Path, sidecar: dict[str, Any], config: Mapping[str, Any] | None) -> None:
    if config:
        defaults = default_config()["transforms"]  # a run from before a key existed: its default
        sidecar["preprocessing"] = {
            k: config.get("transforms", {}).get(k, defaults[k]) for k in PREPROCESS_KEYS
        }
    Path(f"{output}.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def export_encoder(
    source: str | Path,
    output: str | Path,
    to: str = "flexible-unet",
    backbone: str | None = None,
    plans: str | Path | None = None,
    configuration: str | None = None,
) -> LoadReport:
    """Write the encoder of a run in the form the target framework loads (see the module docstring).

    Args:
        source: a run directory, ``encoder.pt`` or training checkpoint.
        output: the file to write (parent folders are created).
        to: one of :data:`EXPORT_TARGETS`.
        backbone: ``flexible-unet`` / ``resnet`` only: the ResNet asked for (None: the run's).
        plans, configuration: ``nnunet`` only: the plans JSON and configuration of the network
            to fine-tune (None: the run's ``model.nnunet_plans`` / ``model.nnunet_configuration``).

    Returns:
        The :class:`LoadReport` of the check load.
    """
    if to not in EXPORT_TARGETS:
        raise CheckpointError(
            f"invalid export target {to!r}, must be one of {', '.join(EXPORT_TARGETS)}"
        )
    if to in ("flexible-unet", "resnet"):
        return _export_resnet(source, output, to, backbone)
    state, config, path = read_encoder_state(source)
    model = _model_settings(config)
    if plans is not None:
        model["nnunet_plans"] = str(plans)
    if configuration is not None:
        model["nnunet_configuration"] = configuration
    data = (config or {}).get("data", {})
    first = next(v for v in state.values() if v.ndim >= 4)
    dims, channels = (
        data.get("spatial_dims", first.ndim - 2),
        data.get("in_channels", int(first.shape[1])),
    )
    torch.manual_seed(int((config or {}).get("seed", 0)))  # the decoder's initialisation
    net, name, code = build_downstream(to, model, dims, channels)
    n, total = _load_checked(net, state, path, name)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if to == "nnunet":
        weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        atomic_save({"network_weights": weights, "byol3d_config": dict(config or {})}, output)
    else:
        atomic_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, output)
    sidecar = {"source": str(path), "target": name, "encoder": describe(state), "keys": n,
               "load": code.replace("FILE", repr(str(output)))}  # fmt: skip
    _write_sidecar(output, sidecar, config)
    return LoadReport(n, total, path, infer_architecture(state), describe(state))


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


def _export_resnet(source, output, to: str, backbone: str | None) -> LoadReport:
    """``flexible-unet`` and ``resnet``: a plain ResNet state_dict, checked against the target."""
    state, config, path = read_encoder_state(source)
    arch = infer_architecture(state)
    if arch is None or arch.name not in resnet_params:
        raise CheckpointError(
            f"{str(path)!r} does not hold a MONAI ResNet encoder but a {describe(state)} "
            f"encoder: export it with --to {_target_for(state)}"
        )
    wanted = backbone or arch.name
    if wanted not in resnet_params:
        raise CheckpointError(
            f"invalid backbone {wanted!r}, must be one of {', '.join(resnet_params)}"
        )
    target_arch = Architecture(wanted, arch.spatial_dims, arch.in_channels, "batch")
    module, target_name, code = _target_module(to, target_arch)
    n, _total = _load_checked(module, state, path, target_name)
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
    _write_sidecar(output, sidecar, config)
    return LoadReport(n, len(module.state_dict()), path, arch, str(arch))
