"""The encoders of MONAI's SwinUNETR and SegResNet, built as those networks build them.

* :func:`build_swin_encoder` returns ``SwinUNETR(...).swinViT`` itself (a
  ``monai.networks.nets.swin_unetr.SwinTransformer``): its ``state_dict`` loads with
  ``strict=True`` into ``SwinUNETR(feature_size=..., depths=..., spatial_dims=...).swinViT``,
  the part MONAI's own self-supervised weights cover. Its stages ``layers1.0`` .. ``layers4.0``
  (patch embedding stride 2, then a patch merging per stage) give maps at strides 4, 8, 16, 32.
* :class:`SegResNetEncoder` holds ``convInit`` and ``down_layers`` of a ``SegResNet`` under
  those names, so its ``state_dict`` is exactly the encoder part of
  ``SegResNet(init_filters=..., blocks_down=...)`` (``SegResNet.encode`` runs the same modules);
  ``down_layers.k`` is at stride ``2 ** k``.

Both are built through MONAI's own constructors (the decoder parts are built and dropped), so
their initialisation is MONAI's. Nothing is downloaded.

>>> import torch
>>> enc = SegResNetEncoder(spatial_dims=3, in_channels=1, init_filters=8, blocks_down=(1, 1))
>>> enc(torch.zeros(1, 1, 16, 16, 16)).shape
torch.Size([1, 16, 8, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import SegResNet, SwinUNETR
from torch import nn

SWIN_HEADS = (3, 6, 12, 24)  # SwinUNETR's default num_heads; feature_size must divide by 12


def _positive_ints(name: str, value, length: int | None = None) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if (
        not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        or (length is not None and len(values) != length)
    ):
        n = f"{length} " if length is not None else ""
        raise ValueError(f"invalid {name} {value!r}, must be a list of {n}positive integers")
    return values


def build_swin_encoder(
    spatial_dims: int = 3,
    in_channels: int = 1,
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
) -> nn.Module:
    """``SwinUNETR(in_channels, feature_size=feature_size, depths=depths).swinViT``, randomly initialised.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        feature_size: SwinUNETR's ``feature_size`` (the embedding width; a multiple of 12, as
            SwinUNETR requires; MONAI's self-supervised recipe uses 48). The stages are
            ``feature_size * 2, 4, 8, 16`` wide; the representation is ``16 * feature_size``.
        depths: Swin blocks per stage (four numbers, SwinUNETR's default ``(2, 2, 2, 2)``).

    Inputs must be a multiple of 32 on every axis (SwinUNETR's own rule).
    """
    if not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
        raise ValueError(
            f"invalid swin_feature_size {feature_size!r}, must be a positive multiple of 12 "
            "(SwinUNETR's rule)"
        )
    depths = _positive_ints("swin_depths", depths, 4)
    net = SwinUNETR(
        in_channels=in_channels,
        out_channels=1,
        feature_size=feature_size,
        depths=depths,
        num_heads=SWIN_HEADS,
        spatial_dims=spatial_dims,
    )
    return net.swinViT


class SegResNetEncoder(nn.Module):
    """The encoder of ``monai.networks.nets.SegResNet``: ``convInit`` then ``down_layers``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        init_filters: SegResNet's ``init_filters`` (a multiple of 8: its group norm has 8 groups).
        blocks_down: residual blocks per level (SegResNet's ``blocks_down``); level ``k`` is
            ``init_filters * 2 ** k`` wide at stride ``2 ** k`` (a padded 3x3 stride-2 conv
            opens every level but the first).

    ``forward`` returns the deepest level's map, as ``SegResNet.encode`` computes it
    (without the optional dropout, which SegResNet has off by default).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        init_filters: int = 8,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
    ) -> None:
        super().__init__()
        if not isinstance(init_filters, int) or init_filters < 8 or init_filters % 8:
            raise ValueError(
                f"invalid segresnet_init_filters {init_filters!r}, must be a positive multiple of 8 "
                "(SegResNet's group norm has 8 groups)"
            )
        blocks_down = _positive_ints("segresnet_blocks_down", blocks_down)
        if len(blocks_down) < 2:
            raise ValueError(
                f"invalid segresnet_blocks_down {list(blocks_down)!r}, must have at least 2 levels"
            )
        net = SegResNet(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=2,
            blocks_down=blocks_down,
            blocks_up=(1,) * (len(blocks_down) - 1),
        )
        self.convInit = net.convInit
        self.down_layers = net.down_layers
        self.init_filters = init_filters
        self.blocks_down = blocks_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convInit(x)
        for down in self.down_layers:
            x = down(x)
        return x
