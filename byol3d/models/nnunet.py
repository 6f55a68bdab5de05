"""nnU-Net's network from a plans file, and its encoder in byol3d's axis order.

nnU-Net (v2.4+) writes the network of every configuration into its plans file
(``nnUNetResEncUNetLPlans.json``, ...): ``configurations[<name>]["architecture"]`` holds the
class (``dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`` for the
residual-encoder presets) and its keyword arguments. :func:`build_nnunet_network` builds that
network with ``dynamic-network-architectures`` (``pip install byol3d[nnunet]``) and applies
the class's ``initialize``, as nnU-Net's trainer does; :class:`NnUNetEncoder` is its encoder.

Axis order. nnU-Net reads images with SimpleITK (arrays ``(z, y, x)``, the reverse of the
file's index order) and then transposes them by the plans' ``transpose_forward``; its patch
size, spacing, kernels and strides are in that order. byol3d's volumes are ``(x, y, z)``
(RAS). :class:`NnUNetEncoder` permutes its input into nnU-Net's order before the first layer
and its stage maps back (through the parameter-free ``taps``), so the weights see volumes
exactly as nnU-Net will show them in fine-tuning, while crops, the dense term and the feature
extractor keep byol3d's order. :func:`read_plans` returns patch size and spacing in byol3d's
order.

Nothing here needs the ``nnunetv2`` package itself.
"""

from __future__ import annotations

import copy
import json
import pydoc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "pip install 'byol3d[nnunet]' (dynamic-network-architectures)"


@dataclass(frozen=True)
class NnUNetPlan:
    """One configuration of an nnU-Net plans file, with sizes in byol3d's axis order.

    Attributes:
        path, configuration: where it was read from.
        network_class_name, arch_kwargs, requires_import: the ``architecture`` entry.
        axes: ``axes[i]`` is the byol3d axis that is nnU-Net's network axis ``i``.
        patch_size, spacing: the configuration's, in byol3d's axis order.
        normalization: ``normalization_schemes`` (e.g. ``["CTNormalization"]``).
        intensity: ``foreground_intensity_properties_per_channel`` (percentiles, mean, std).
    """

    path: str
    configuration: str
    network_class_name: str
    arch_kwargs: dict[str, Any]
    requires_import: tuple[str, ...]
    axes: tuple[int, ...]
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...] | None
    normalization: tuple[str, ...]
    intensity: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_strides(self) -> list[tuple[int, ...]]:
        """Total stride of each encoder stage per byol3d axis."""
        total = [1] * len(self.axes)
        out = []
        for stride in self.arch_kwargs.get("strides", []):
            per_axis = [stride] * len(self.axes) if isinstance(stride, int) else list(stride)
            for i, s in enumerate(per_axis):
                total[self.axes[i]] *= int(s)
            out.append(tuple(total))
        return out

    def ct_window(self) -> tuple[float, float] | None:
        """The clip range of nnU-Net's CTNormalization (foreground 0.5 and 99.5 percentiles)."""
        if self.normalization[:1] != ("CTNormalization",):
            return None
        props = self.intensity.get("0", {})
        lo, hi = props.get("percentile_00_5"), props.get("percentile_99_5")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi:
            return float(lo), float(hi)
        return None


def _configuration(configs: Mapping[str, Any], name: str, path: str, seen=()) -> dict[str, Any]:
    if name not in configs:
        raise ValueError(
            f"the nnU-Net plans {path!r} have no configuration {name!r}; they have "
            f"{', '.join(configs)}"
        )
    entry = dict(configs[name])
    parent = entry.pop("inherits_from", None)
    if parent is None:
        return entry
    if parent in seen:
        raise ValueError(f"the nnU-Net plans {path!r}: configuration {name!r} inherits in a loop")
    merged = copy.deepcopy(_configuration(configs, parent, path, (*seen, name)))
    merged.update(entry)
    return merged


def read_plans(path: str | Path, configuration: str = "3d_fullres") -> NnUNetPlan:
    """Read one configuration of an nnU-Net v2 plans JSON file (``inherits_from`` resolved).

    Raises:
        ValueError: a missing or unreadable file, an unknown configuration (the message lists
            the file's), plans older than nnU-Net 2.4 (no ``architecture`` entry) or a 2D
            configuration (byol3d's nnU-Net encoder is 3D).
    """
    path = str(path)
    try:
        plans = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read the nnU-Net plans {path!r}: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"the nnU-Net plans {path!r} are not valid JSON: {err}") from err
    if not isinstance(plans, Mapping) or not isinstance(plans.get("configurations"), Mapping):
        raise ValueError(f"{path!r} is not an nnU-Net plans file (no 'configurations')")
    cfg = _configuration(plans["configurations"], configuration, path)
    arch = cfg.get("architecture")
    if not isinstance(arch, Mapping) or "network_class_name" not in arch:
        raise ValueError(
            f"configuration {configuration!r} of {path!r} has no 'architecture' entry "
            "(plans of nnU-Net before 2.4): plan the dataset again with nnU-Net 2.4 or newer"
        )
    patch = [int(p) for p in cfg.get("patch_size", [])]
    if len(patch) != 3:
        raise ValueError(
            f"configuration {configuration!r} of {path!r} is not 3D (patch_size {patch}); "
            "byol3d pretrains nnU-Net's 3D configurations (e.g. 3d_fullres)"
        )
    transpose = [int(t) for t in plans.get("transpose_forward", [0, 1, 2])]
    axes = tuple(2 - t for t in transpose)  # SimpleITK reverses the axes, then nnU-Net transposes
    order = sorted(range(3), key=lambda i: axes[i])  # byol3d axis a is network axis order[a]
    spacing = cfg.get("spacing")
    return NnUNetPlan(
        path=path,
        configuration=configuration,
        network_class_name=str(arch["network_class_name"]),
        arch_kwargs=dict(arch.get("arch_kwargs", {})),
        requires_import=tuple(arch.get("_kw_requires_import", ())),
        axes=axes,
        patch_size=tuple(patch[order[a]] for a in range(3)),
        spacing=None if spacing is None else tuple(float(spacing[order[a]]) for a in range(3)),
        normalization=tuple(cfg.get("normalization_schemes", ())),
        intensity=dict(plans.get("foreground_intensity_properties_per_channel", {})),
    )


def build_nnunet_network(
    plan: NnUNetPlan, in_channels: int, num_classes: int = 2, deep_supervision: bool = True
) -> nn.Module:
    """The network nnU-Net trains for ``plan`` (its class, keyword arguments and ``initialize``).

    ``num_classes`` and ``deep_supervision`` only change the ``seg_layers``, which nnU-Net's
    ``load_pretrained_weights`` never transfers.
    """
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"model.encoder nnunet needs dynamic-network-architectures: {INSTALL_HINT}"
        ) from err
    cls = pydoc.locate(plan.network_class_name)
    if not isinstance(cls, type):
        raise ValueError(
            f"the nnU-Net plans {plan.path!r} name the network class "
            f"{plan.network_class_name!r}, which is not importable here"
        )
    kwargs = dict(plan.arch_kwargs)
    for key in plan.requires_import:
        if kwargs.get(key) is not None:
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(
                    f"the nnU-Net plans {plan.path!r}: cannot import {key} {kwargs[key]!r}"
                )
            kwargs[key] = located
    net = cls(
        input_channels=in_channels,
        num_classes=num_classes,
        deep_supervision=deep_supervision,
        **kwargs,
    )
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


class NnUNetEncoder(nn.Module):
    """The encoder (``stem``, ``stages``) of an nnU-Net network, in byol3d's axis order.

    Its state_dict keys are those of ``network.encoder`` (``stem.*``, ``stages.*``; no
    ``taps``, which hold no parameters), so it loads with ``strict=True`` into the encoder of
    the network built from the same plans. ``taps.k`` returns stage ``k``'s map permuted back
    to byol3d's axis order (a hook on it sees ``(B, C, x, y, z)``); ``forward`` returns the
    deepest one.

    Args:
        network_encoder: ``network.encoder`` of :func:`build_nnunet_network`.
        plan: the plans it was built from (axis order and stage strides).
    """

    def __init__(self, network_encoder: nn.Module, plan: NnUNetPlan) -> None:
        super().__init__()
        stages = getattr(network_encoder, "stages", None)
        if not isinstance(stages, nn.Sequential):
            raise ValueError(
                f"the network of {plan.path!r} ({plan.network_class_name}) has no encoder.stages; "
                "byol3d pretrains ResidualEncoderUNet and PlainConvUNet plans"
            )
        self.stem = getattr(network_encoder, "stem", None)
        self.stages = stages
        self.taps = nn.ModuleList(nn.Identity() for _ in stages)
        self.residual = type(network_encoder).__name__ == "ResidualEncoder"
        self.class_name = plan.network_class_name.rsplit(".", 1)[-1]
        self.stage_strides = plan.stage_strides
        self.patch_size = plan.patch_size
        self.to_network = tuple(2 + a for a in plan.axes)
        self.to_byol3d = tuple(2 + plan.axes.index(a) for a in range(len(plan.axes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, *self.to_network)
        if self.stem is not None:
            x = self.stem(x)
        out = x
        for stage, tap in zip(self.stages, self.taps, strict=True):
            x = stage(x)
            out = tap(x.permute(0, 1, *self.to_byol3d))
        return out


class NnUNetNetwork(nn.Module):
    """nnU-Net's network taking and returning volumes in byol3d's axis order.

    For fine-tuning inside byol3d's scripts, whose volumes are ``(x, y, z)``: the input is
    permuted into nnU-Net's order, the logits back. ``encoder`` is the network's encoder (so
    :func:`byol3d.load_into` fills it); ``network`` is nnU-Net's module itself.
    """

    def __init__(self, network: nn.Module, plan: NnUNetPlan) -> None:
        super().__init__()
        self.network = network
        self.to_network = (0, 1, *(2 + a for a in plan.axes))
        self.to_byol3d = (0, 1, *(2 + plan.axes.index(a) for a in range(len(plan.axes))))

    @property
    def encoder(self) -> nn.Module:
        return self.network.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x.permute(*self.to_network))
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output
            out = out[0]
        return out.permute(*self.to_byol3d)


def build_nnunet_encoder(
    plans: str | Path | None, configuration: str, spatial_dims: int, in_channels: int
) -> NnUNetEncoder:
    """The encoder of nnU-Net's network for ``plans`` / ``configuration``, nnU-Net's init."""
    if not plans:
        raise ValueError(
            "model.encoder nnunet needs model.nnunet_plans (an nnU-Net plans JSON file)"
        )
    if spatial_dims != 3:
        raise ValueError(f"model.encoder nnunet is 3D only, got spatial_dims {spatial_dims}")
    plan = read_plans(plans, configuration)
    return NnUNetEncoder(build_nnunet_network(plan, in_channels).encoder, plan)


def crop_divisor(plan: NnUNetPlan) -> tuple[int, ...]:
    """Per byol3d axis, what a crop size must be a multiple of: the deepest stage's stride."""
    strides = plan.stage_strides
    return strides[-1] if strides else (1,) * len(plan.axes)


def check_crop(plan: NnUNetPlan, roi_size: Sequence[int]) -> str | None:
    """None when ``roi_size`` suits the network, else what is wrong (one phrase)."""
    div = crop_divisor(plan)
    if len(roi_size) != len(div) or any(
        r < 1 or r % d for r, d in zip(roi_size, div, strict=False)
    ):
        return (
            f"a multiple of {list(div)} per axis (the strides of {Path(plan.path).name}'s encoder)"
        )
    return None
