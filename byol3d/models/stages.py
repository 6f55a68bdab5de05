"""The stages of byol3d's encoders: which module each is, its stride, where its cells sit.

:func:`encoder_stages` names every encoder's stages alike: ``layer1`` .. ``layer4`` are the
stages at strides 4, 8, 16, 32 where the network has them, ``avgpool`` is the representation.
The hooks (:class:`byol3d.models.encoders.HookedEncoder`, the feature extractor) and the dense
term (:mod:`byol3d.models.dense`) resolve layer names here.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai.networks.nets import ResNet
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from byol3d.models.monai_encoders import SegResNetEncoder
from byol3d.models.nnunet import NnUNetEncoder


@dataclass(frozen=True)
class Stage:
    """One stage of an encoder: its module, total stride and how its cells sit on the input.

    Attributes:
        module: the name in ``dict(net.named_modules())`` a hook goes on.
        stride: total stride per spatial axis.
        cells: ``"padded"`` (padded odd-kernel strided convolutions: cell ``j`` centred on
            input voxel ``stride * j``), ``"patch"`` (non-overlapping patches: cell ``j`` is
            the patch ``[stride * j, stride * (j + 1))``, centred on ``stride * j + (stride - 1) / 2``)
            or None when the centre depends on the weights (no dense term there).
        why: for ``cells`` None, the reason, in a phrase.
    """

    module: str
    stride: tuple[int, ...]
    cells: str | None
    why: str = ""


def _resnet_stages(dims: int) -> list[Stage]:
    return [Stage(f"layer{k}", (2 ** (k + 1),) * dims, "padded") for k in range(1, 5)]


_ENC_WHY = (
    "nnU-Net's residual blocks downsample by a stride-2 convolution (cells on input voxel 2j) "
    "plus an average-pooled shortcut (cells on 2j + 0.5), so where a cell sits depends on the "
    "weights"
)


def _stage_list(net: nn.Module) -> list[Stage]:
    """The spatial stages of a known encoder, shallow to deep; [] for any other network."""
    if isinstance(net, ResNet):
        return _resnet_stages(net.conv1.weight.ndim - 2)
    if isinstance(net, SwinTransformer):
        dims = net.patch_embed.proj.weight.ndim - 2
        return [Stage(f"layers{k}.0", (2 ** (k + 1),) * dims, "patch") for k in range(1, 5)]
    if isinstance(net, SegResNetEncoder):
        dims = net.convInit.conv.weight.ndim - 2
        return [
            Stage(f"down_layers.{k}", (2**k,) * dims, "padded") for k in range(len(net.down_layers))
        ]
    if isinstance(net, NnUNetEncoder):
        cells, why = (None, _ENC_WHY) if net.residual else ("padded", "")
        return [
            Stage(f"taps.{k}", tuple(stride), cells if max(stride) > 1 else "padded", why)
            for k, stride in enumerate(net.stage_strides)
        ]
    return []


def encoder_stages(net: nn.Module) -> dict[str, Stage]:
    """The stages of ``net`` by every name they answer to, shallow to deep.

    Each stage is listed under its module name (``layer3``, ``layers3.0``, ``down_layers.2``,
    ``taps.4``) and, where its largest stride is 4, 8, 16 or 32, under the alias ``layer1`` ..
    ``layer4`` (the first stage of that stride), so ``model.dense_layer: layer2`` means the
    stride-8 stage of any encoder. ``avgpool`` names the representation: MONAI ResNet's own
    ``avgpool`` module, else the deepest stage (its map is averaged, ViT tokens included).

    >>> from byol3d.models.encoders import build_encoder
    >>> sorted(encoder_stages(build_encoder("resnet10")))[:3]
    ['avgpool', 'layer1', 'layer2']
    """
    stages = _stage_list(net)
    named: dict[str, Stage] = {}
    for k in range(1, 5):
        first = next((st for st in stages if max(st.stride) == 2 ** (k + 1)), None)
        if first is not None:
            named[f"layer{k}"] = first
    for st in stages:
        named.setdefault(st.module, st)
    if stages:
        deepest = stages[-1]
        named["avgpool"] = (
            Stage("avgpool", deepest.stride, None, "a pooled vector")
            if isinstance(net, ResNet)
            else deepest
        )
    return named


def resolve_layer(net: nn.Module, name: str) -> str:
    """The module name behind a stage name or alias of :func:`encoder_stages` (else ``name``)."""
    stage = encoder_stages(net).get(name)
    return stage.module if stage is not None else name


def deepest_stage(net: nn.Module) -> str:
    """The module name of ``net``'s deepest spatial stage (``layer4`` for a ResNet)."""
    stages = _stage_list(net)
    if not stages:
        raise ValueError(f"{type(net).__name__} is not an encoder byol3d knows the stages of")
    return stages[-1].module


def dense_cells(net: nn.Module, layer: str) -> str:
    """How the cells of ``layer`` (a stage name or alias) sit on the input, for the dense term.

    Raises:
        ValueError: ``layer`` is not a stage of the encoder (the message lists them), or its
            cells have no fixed position (nnU-Net's residual encoder).
    """
    stages = encoder_stages(net)
    if not stages:  # a network byol3d does not know: padded convolutions assumed
        return "padded"
    stage = stages.get(layer) or next((st for st in stages.values() if st.module == layer), None)
    if stage is None or stage.module == "avgpool":
        names = ", ".join(n for n in stages if n != "avgpool")
        raise ValueError(
            f"invalid dense_layer {layer!r}: not a stage of the encoder; its stages are {names}"
        )
    if stage.cells is None:
        raise ValueError(
            f"the dense term cannot use {layer!r} of this encoder: {stage.why}; "
            "set model.dense_weight 0 (global BYOL) or use a PlainConvUNet plan"
        )
    return stage.cells
