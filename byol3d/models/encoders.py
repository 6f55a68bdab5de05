"""Encoders and hook-based representation extraction.

``model.encoder`` picks the network byol3d pretrains, the encoder of the network you will
fine-tune: a MONAI ResNet (resnet10 ... resnet200, FlexibleUNet's encoder), ``swin_unetr``
(SwinUNETR's ``swinViT``), ``segresnet`` (SegResNet's ``convInit`` + ``down_layers``,
:mod:`byol3d.models.monai_encoders`) or ``nnunet`` (the encoder of nnU-Net's network from a
plans file, :mod:`byol3d.models.nnunet`). :func:`~byol3d.models.stages.encoder_stages` names
every encoder's stages alike: ``layer1`` .. ``layer4`` are the stages at strides 4, 8, 16, 32
where the network has them, ``avgpool`` is the representation (for non-ResNets the deepest
stage, averaged).

The ResNet is a ``monai.networks.nets.ResNet`` built exactly as MONAI's own
``FlexibleUNet`` builds its encoder (``monai.networks.nets.resnet.ResNetFeatures``):
conv1 with stride 2, the block type, layer counts, shortcut type and downsample bias
of ``monai.networks.nets.resnet.resnet_params``, and ``feed_forward=False``. Two
consequences matter to users:

* its ``state_dict`` loads with ``strict=True`` into
  ``FlexibleUNet(backbone=name, spatial_dims=...).encoder`` (batch norm, the default);
* its ``forward`` runs through ``avgpool`` (unlike ``ResNetFeatures.forward``, which
  returns the list of feature maps), so a hook on ``avgpool`` fires.

Nothing here downloads weights: MedicalNet weights are never fetched.

>>> import torch
>>> from byol3d.models.encoders import build_encoder, HookedEncoder
>>> enc = build_encoder("resnet10", spatial_dims=3, in_channels=1)
>>> HookedEncoder(enc, "avgpool").feature_dim((1, 32, 32, 32))
512
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers import get_norm_layer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import get_inplanes, resnet_params
from torch import nn

from byol3d.models.monai_encoders import SegResNetEncoder, build_swin_encoder
from byol3d.models.nnunet import build_nnunet_encoder
from byol3d.models.stages import dense_cells, encoder_stages, resolve_layer

RESNETS = tuple(resnet_params)  # resnet10, resnet18, ..., resnet200
ENCODERS = (*RESNETS, "nnunet", "swin_unetr", "segresnet")

#: The architecture settings of the non-ResNet encoders (``model.<key>``), with defaults.
ARCH_DEFAULTS = {
    "swin_feature_size": 48,
    "swin_depths": (2, 2, 2, 2),
    "segresnet_init_filters": 8,
    "segresnet_blocks_down": (1, 2, 2, 4),
    "nnunet_plans": None,
    "nnunet_configuration": "3d_fullres",
}


NORMS = ("batch", "group", "instance")


def arch_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`ARCH_DEFAULTS` keys of a ``model`` section (defaults for missing ones)."""
    return {key: model.get(key, default) for key, default in ARCH_DEFAULTS.items()}


def _norm_arg(norm: str) -> str | tuple:
    if norm == "batch":
        return "batch"
    if norm == "group":
        # 32 groups divide every ResNet width (64 ... 2048); the common default.
        return ("group", {"num_groups": 32})
    if norm == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"invalid norm {norm!r}, must be one of {', '.join(NORMS)}")


def build_encoder(
    name: str = "resnet50",
    spatial_dims: int = 3,
    in_channels: int = 1,
    norm: str = "batch",
    *,
    swin_feature_size: int = 48,
    swin_depths: Sequence[int] = (2, 2, 2, 2),
    segresnet_init_filters: int = 8,
    segresnet_blocks_down: Sequence[int] = (1, 2, 2, 4),
    nnunet_plans: str | Path | None = None,
    nnunet_configuration: str = "3d_fullres",
) -> nn.Module:
    """Build an encoder, randomly initialised as its downstream network initialises it.

    Args:
        name: ``resnet10, resnet18, resnet34, resnet50, resnet101, resnet152, resnet200``
            (FlexibleUNet's encoder), ``swin_unetr``, ``segresnet`` or ``nnunet``.
        spatial_dims: 2 (frames) or 3 (volumes).
        in_channels: input channels: 1 for CT, 3 for RGB frames.
        norm: ``"batch"`` (default; the only choice that loads strictly into FlexibleUNet, whose
            encoder uses batch norm), ``"group"`` (32 groups) or ``"instance"`` (affine). Group
            or instance norm are steadier than batch norm at the batch sizes of 2-8 volumes that
            3D training affords. ResNets only: the other networks bring their own (SwinUNETR
            layer norm, SegResNet group norm, nnU-Net the plans' norm).
        swin_feature_size, swin_depths: ``swin_unetr``'s ``feature_size`` and ``depths``.
        segresnet_init_filters, segresnet_blocks_down: ``segresnet``'s ``init_filters`` and
            ``blocks_down``.
        nnunet_plans, nnunet_configuration: ``nnunet``'s plans JSON file and configuration.

    Returns:
        For ResNets a ``monai.networks.nets.ResNet`` with ``feed_forward=False``: ``forward`` returns the
        ``avgpool`` output flattened to ``(batch, features)`` (512 for resnet10/18/34, 2048 for
        resnet50 and deeper). Children: conv1, bn1, act, maxpool, layer1..layer4, avgpool.

    Example:
        >>> enc = build_encoder("resnet18", spatial_dims=2, in_channels=3)
        >>> enc(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 512])
    """
    if name not in ENCODERS:
        raise ValueError(f"invalid encoder {name!r}, must be one of {', '.join(ENCODERS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"invalid spatial_dims {spatial_dims!r}, must be 2 or 3")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"invalid in_channels {in_channels!r}, must be a positive integer")
    norm_arg = _norm_arg(norm)
    if name not in resnet_params and norm != "batch":
        raise ValueError(
            f"invalid norm {norm!r} for encoder {name!r}: norm applies to ResNets; {name} keeps "
            "its own normalisation (leave norm at batch)"
        )
    if name == "swin_unetr":
        return build_swin_encoder(spatial_dims, in_channels, swin_feature_size, swin_depths)
    if name == "segresnet":
        return SegResNetEncoder(
            spatial_dims, in_channels, segresnet_init_filters, segresnet_blocks_down
        )
    if name == "nnunet":
        return build_nnunet_encoder(nnunet_plans, nnunet_configuration, spatial_dims, in_channels)
    block, layers, shortcut_type, bias_downsample, _ = resnet_params[name]
    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=get_inplanes(),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_stride=2,
        shortcut_type=shortcut_type,
        feed_forward=False,
        bias_downsample=bias_downsample,
        norm=norm_arg,
    )
    if norm != "batch":
        # MONAI's ResNet applies `norm` to its stem only (the residual layers are built with
        # batch norm whatever `norm` says), so swap every batch norm for the requested layer.
        _replace_batch_norm(net, norm_arg, spatial_dims)
    return net


def _replace_batch_norm(module: nn.Module, norm: str | tuple, spatial_dims: int) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(
                module,
                child_name,
                get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features),
            )
        else:
            _replace_batch_norm(child, norm, spatial_dims)


def layer_outputs(
    net: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    labels: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """One forward of ``net`` on ``x``; the outputs of the submodules named ``layers``.

    The one forward-hook implementation of byol3d (:class:`HookedEncoder` and the feature
    extractor use it): hooks live for this call only and are removed also when the forward
    raises; the outputs are kept in local lists, never in a cache on the module, so nothing
    survives ``deepcopy``/``torch.save`` and ``DataParallel`` replicas (which share the
    original module's hook dict) each keep only their own output.

    Args:
        net: the network.
        x: its input.
        layers: names from ``dict(net.named_modules())``.
        labels: how errors name each layer (default ``"layer 'name'"``).

    Raises:
        RuntimeError: a layer that the forward never ran, or whose output is not a tensor.
    """
    labels = list(labels) if labels is not None else [f"layer {name!r}" for name in layers]
    modules = [net.get_submodule(name) for name in layers]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        module.register_forward_hook(
            lambda m, _i, out, module=module, store=store: (
                store.append(out) if m is module else None
            )
        )
        for module, store in zip(modules, captured, strict=True)
    ]
    try:
        net(x)
    finally:
        for handle in handles:
            handle.remove()
    for label, store in zip(labels, captured, strict=True):
        if not store:
            raise RuntimeError(
                f"{label} was never called in the encoder's forward; "
                "choose a layer that the forward pass runs (e.g. 'avgpool' or 'layer4')"
            )
        if not isinstance(store[-1], torch.Tensor):
            raise RuntimeError(f"{label} returned {type(store[-1]).__name__}, not a tensor")
    return [store[-1] for store in captured]


class HookedEncoder(nn.Module):
    """Any network plus the name of the layer whose output is the representation.

    A forward hook is registered on ``layer`` for the duration of one forward call and
    removed right after (also when the forward raises), and the captured output lives in a
    local variable: no hook survives ``deepcopy`` or ``torch.save``, and there is no
    per-device cache, so the module is safe under ``DataParallel`` and DDP (the failure mode
    of byol-pytorch#50/#58, where a device-keyed dict came back empty). A spatial output
    (``(B, C, *spatial)``, e.g. ``layer4``) is global-average-pooled; any other output is
    flattened to ``(B, features)``.

    Args:
        net: the encoder, e.g. from :func:`build_encoder`. It is stored as ``self.net``, so a
            state_dict key ``net.conv1.weight`` belongs to ``net``'s ``conv1.weight``.
        layer: a name from ``dict(net.named_modules())`` or a stage name of
            :func:`~byol3d.models.stages.encoder_stages`; ``"avgpool"`` by default (for
            non-ResNets: the deepest stage).
        dense_layer: optionally a second layer whose spatial output
            :meth:`forward_with_map` returns next to the representation, from the same
            forward pass (dense BYOL, :mod:`byol3d.models.dense`). It adds no parameters.

    Raises:
        ValueError: when ``layer`` or ``dense_layer`` is not a submodule of ``net`` (the
            message lists the top-level names).
    """

    def __init__(
        self, net: nn.Module, layer: str = "avgpool", dense_layer: str | None = None
    ) -> None:
        super().__init__()
        names = dict(net.named_modules())
        stages = encoder_stages(net)
        for arg, value in (("hidden_layer", layer), ("dense_layer", dense_layer)):
            if (arg == "hidden_layer" or value is not None) and (
                not value or resolve_layer(net, value) not in names
            ):
                top = ", ".join(stages or [name for name, _ in net.named_children()])
                raise ValueError(
                    f"invalid {arg} {value!r}: not a layer of the encoder; its layers are {top}"
                )
        self.net = net
        self.layer = resolve_layer(net, layer)
        self.dense_layer = None if dense_layer is None else resolve_layer(net, dense_layer)
        #: how the dense layer's cells sit on the input
        #: (see :func:`~byol3d.models.stages.dense_cells`)
        self.dense_cells = None if dense_layer is None else dense_cells(net, dense_layer)
        #: True once :meth:`feature_dim` found that ``net(x)`` itself is the ``layer`` output
        #: (MONAI's ResNet with ``avgpool``): :meth:`forward` then runs no hook, so the
        #: network's forward can be compiled as one graph.
        self.direct = False

    def _capture(self, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        labels = [
            f"{'hidden_layer' if name == self.layer else 'dense_layer'} {name!r}" for name in layers
        ]
        return layer_outputs(self.net, x, layers, labels=labels)

    @staticmethod
    def _pool(out: torch.Tensor) -> torch.Tensor:
        if out.ndim > 2:
            out = out.mean(dim=tuple(range(2, out.ndim)))
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct:
            return self._pool(self.net(x))
        return self._pool(self._capture(x, [self.layer])[0])

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass giving the representation and the ``dense_layer`` feature map.

        Returns:
            ``(representation (B, features), feature map (B, C, *spatial))``.

        Raises:
            ValueError: when the encoder was built without a ``dense_layer``.
        """
        if self.dense_layer is None:
            raise ValueError(
                "forward_with_map needs a dense_layer (HookedEncoder(..., dense_layer=...))"
            )
        rep, fmap = self._capture(x, [self.layer, self.dense_layer])
        return self._pool(rep), fmap

    @torch.no_grad()
    def feature_dim(self, input_shape: Sequence[int]) -> int:
        """Representation size, found by a dry run on one input of ``input_shape`` (C, *spatial).

        The dry run uses batch size 1 in eval mode (so batch norm accepts it) on the device of
        the network's parameters, and restores the training mode afterwards. It also checks
        whether the network's own output is the ``layer`` output (flattened), and if so sets
        :attr:`direct`.
        """
        shape = tuple(int(s) for s in input_shape)
        param = next(self.net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        was_training = self.training
        self.eval()
        try:
            x = torch.zeros((1, *shape), device=device, dtype=dtype)
            out = self(x)
            if not self.direct:
                whole = self.net(x)
                same = isinstance(whole, torch.Tensor) and whole.shape[0] == 1
                same = same and self._pool(whole).shape == out.shape
                self.direct = bool(same and torch.allclose(self._pool(whole), out, atol=1e-6))
        except RuntimeError as err:
            raise ValueError(
                f"the encoder cannot take inputs of shape {shape} (channels, *spatial): {err}"
            ) from err
        finally:
            self.train(was_training)
        return int(out.shape[1])
