"""BYOL's heads: the projector/predictor MLP (global) and its per-location twin (dense term)."""

from __future__ import annotations

from monai.networks.layers import Conv, Norm
from torch import nn


class MLP(nn.Sequential):
    """BYOL's projector/predictor: Linear(d, hidden) - BatchNorm1d - ReLU - Linear(hidden, out).

    The paper (Grill et al. 2020, section 3.3) uses hidden 4096 and output 256 for both the
    projector g and the predictor q.

    >>> import torch
    >>> MLP(2048, 4096, 256)(torch.zeros(4, 2048)).shape
    torch.Size([4, 256])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        for arg, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {arg} {value!r}, must be a positive integer")
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class DenseHead(nn.Sequential):
    """BYOL's projector/predictor at every location: Conv1x1 - BatchNorm - ReLU - Conv1x1.

    Equal to :class:`MLP` applied to each voxel's feature vector, with batch
    norm statistics over the batch and all locations.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the feature map.
        hidden_channels: hidden width (the global heads' ``hidden_dim``).
        out_channels: output width (the global heads' ``projection_dim``).

    >>> import torch
    >>> DenseHead(3, 256, 64, 16)(torch.zeros(2, 256, 3, 3, 3)).shape
    torch.Size([2, 16, 3, 3, 3])
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, hidden_channels: int, out_channels: int
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"invalid spatial_dims {spatial_dims!r}, must be 2 or 3")
        for arg, value in (
            ("in_channels", in_channels),
            ("hidden_channels", hidden_channels),
            ("out_channels", out_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {arg} {value!r}, must be a positive integer")
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        super().__init__(
            conv(in_channels, hidden_channels, kernel_size=1),
            norm(hidden_channels),
            nn.ReLU(inplace=True),
            conv(hidden_channels, out_channels, kernel_size=1),
        )
