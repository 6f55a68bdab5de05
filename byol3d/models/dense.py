"""Dense (local) BYOL: the BYOL loss between the two views' feature maps, location by location.

Global BYOL compares one pooled vector per view. The crop boxes, flips and turns of the two
views are recorded (:mod:`byol3d.transforms.crops`, :mod:`byol3d.transforms.geometry`), so for
every sample the region of the source image seen by both views is known too, and so are the
positions in each view's feature map that look at the same anatomy. The dense term:

1. takes a spatial feature map of the encoder (``dense_layer``, e.g. ``layer3``) from the
   same forward pass as the global representation;
2. projects it with :class:`DenseHead` (1x1 convolutions: Conv-BN-ReLU-Conv, BYOL's MLP applied
   at every location) and, on the online side, a dense predictor of the same shape; the target
   side has EMA copies of the dense projector, updated with the rest of the target;
3. samples ``grid ** spatial_dims`` points on a regular grid in the overlap of the two boxes
   (:func:`~byol3d.models.correspondence.overlap_points`), maps them into each view
   (:func:`~byol3d.models.correspondence.source_to_view`, which undoes crop, flips and
   rotations), then to continuous feature-cell indices by the encoder's real geometry
   (:func:`~byol3d.models.correspondence.view_to_cells`) and reads the online prediction of
   view 1 and the target projection of view 2 there with ``grid_sample`` ((multi)linear
   between cell centres), and symmetrically;
4. applies BYOL's ``2 - 2 cos`` per point and averages over the points of all samples whose
   boxes overlap; samples without overlap contribute nothing (all disjoint: the term is 0).

The total loss is ``global + dense_weight * dense``. Feature cells: given the views' spatial
shape (``view_shape``, the encoder's input), cell ``j`` of a map with total stride ``s`` is
read as centred on view voxel ``s * j``, where MONAI ResNet's padded strided convolutions
centre it (measured with input gradients in ``tests/models/test_dense_geometry.py``); the
stride follows from the view and map sizes
(:func:`~byol3d.models.correspondence.feature_stride`). Without ``view_shape`` the map is
taken to cover equal shares of the view (cell ``j`` of ``n`` centred at ``(j + 0.5) / n``),
which is exact only for maps at the view's own resolution: for layer2 it puts cells 3.5
voxels off (7.5 for layer3), and flipped partners end up about 0.9 cell apart.

>>> import torch
>>> p = torch.randn(2, 8, 4, 4, 4); z = torch.randn(2, 8, 4, 4, 4)
>>> grid = torch.zeros(2, 5, 3)            # 5 points at the centre of each map
>>> dense_byol_loss(p, z, grid, grid, torch.tensor([True, False])).shape
torch.Size([])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from byol3d.models.correspondence import overlap_points, source_to_view, view_to_cells


def sample_map(
    fmap: torch.Tensor,
    coords: torch.Tensor,
    view_shape: Sequence[int] | None = None,
    stride: float | Sequence[float] | None = None,
    offset: float | Sequence[float] = 0.0,
    cells: str = "padded",
) -> torch.Tensor:
    """Read a feature map at normalised view coordinates, (multi)linearly.

    Args:
        fmap: ``(B, C, *spatial)`` feature map of the whole view.
        coords: ``(B, P, spatial_dims)`` view coordinates in [0, 1] per axis, in the map's axis
            order (as returned by :func:`~byol3d.models.correspondence.source_to_view`).
        view_shape: the view's spatial shape (the encoder's input). Given, the points are
            placed on the map by the encoder's geometry
            (:func:`~byol3d.models.correspondence.view_to_cells`: cell ``j`` centred on view
            voxel ``stride * j + offset``). None: ``fmap`` is taken to cover the view in equal
            shares (cell ``j`` of ``n`` centred at ``(j + 0.5) / n``), exact when ``fmap`` has
            the view's own resolution (the view itself, or a stride-1 map).
        stride, offset, cells: see :func:`~byol3d.models.correspondence.view_to_cells` (only
            with ``view_shape``; ``stride`` None derives it from the sizes; ``cells`` is
            ``"padded"`` for convolutional encoders, ``"patch"`` for Swin).

    Returns:
        ``(B, C, P)`` float32 values (``grid_sample``, ``align_corners=False``, border padding:
        points beyond the outer cell centres read the outer cells).
    """
    dims = fmap.ndim - 2
    if coords.ndim != 3 or coords.shape[-1] != dims or coords.shape[0] != fmap.shape[0]:
        raise ValueError(
            f"coords must have shape (batch {fmap.shape[0]}, P, {dims}) for a map of shape "
            f"{tuple(fmap.shape)}, got {tuple(coords.shape)}"
        )
    b, p = coords.shape[:2]
    if view_shape is None:
        if stride is not None:
            raise ValueError("stride needs view_shape (the view's spatial shape)")
        unit = coords.float()  # the map's own normalised coordinates
    else:
        index = view_to_cells(coords, view_shape, fmap.shape[2:], stride, offset, cells)
        size = torch.tensor([float(n) for n in fmap.shape[2:]], device=coords.device)
        unit = (index + 0.5) / size  # cell j's centre at (j + 0.5) / n, align_corners=False
    grid = (2.0 * unit - 1.0).flip(-1)  # grid_sample: x indexes the last axis
    grid = grid.reshape(b, *([1] * (dims - 1)), p, dims)
    out = F.grid_sample(
        fmap.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.reshape(b, fmap.shape[1], p)


def dense_byol_loss(
    p_map: torch.Tensor,
    z_map: torch.Tensor,
    p_coords: torch.Tensor,
    z_coords: torch.Tensor,
    valid: torch.Tensor,
    view_shape: Sequence[int] | None = None,
    stride: float | Sequence[float] | None = None,
    cells: str = "padded",
) -> torch.Tensor:
    """One direction of the dense loss: ``2 - 2 cos(p, sg(z))`` at corresponding points.

    Args:
        p_map: online predictions of one view, ``(B, D, *spatial)``.
        z_map: target projections of the other view, ``(B, D, *spatial')``; detached here.
        p_coords, z_coords: ``(B, P, spatial_dims)`` the same P source points in each view's
            normalised coordinates.
        valid: ``(B,)`` bool, False for samples whose views do not overlap.
        view_shape, stride, cells: how view coordinates meet the maps' cells (:func:`sample_map`).

    Returns:
        The mean over the points of valid samples (float32 scalar, in [0, 4]); 0 (still
        differentiable, with zero gradient) when no sample is valid.
    """
    p = F.normalize(sample_map(p_map, p_coords, view_shape, stride, cells=cells), dim=1)
    z = F.normalize(sample_map(z_map.detach(), z_coords, view_shape, stride, cells=cells), dim=1)
    per_point = 2.0 - 2.0 * (p * z).sum(dim=1)  # (B, P)
    weight = valid.to(per_point.device, per_point.dtype).unsqueeze(1).expand_as(per_point)
    # where() rather than a product: a NaN in an ignored sample must not reach the sum
    total = torch.where(weight > 0, per_point, torch.zeros_like(per_point)).sum()
    return total / weight.sum().clamp(min=1.0)


def dense_term(
    p_maps: torch.Tensor,
    z_maps: torch.Tensor,
    geometry1: Mapping[str, torch.Tensor],
    geometry2: Mapping[str, torch.Tensor],
    grid: int = 4,
    spatial_axes: tuple[int, int] = (0, 1),
    view_shape: Sequence[int] | None = None,
    stride: float | Sequence[float] | None = None,
    cells: str = "padded",
) -> torch.Tensor:
    """The symmetric dense loss of a batch of view pairs.

    Args:
        p_maps: online dense predictions, ``(2B, D, *spatial)``: view 1 of each sample, then view 2.
        z_maps: target dense projections, same layout.
        geometry1, geometry2: each view's ``{"box", "flip", "rot90"}`` (see
            :func:`byol3d.training.engine.view_geometry`), ``box`` ``(B, spatial_dims, 2)``.
        grid: points per axis in each overlap.
        spatial_axes: the plane of the recorded 90-degree rotations.
        view_shape: the views' spatial shape (the encoder's input, ``x.shape[2:]``): cells are
            then read where the encoder centres them (:func:`sample_map`). Pass it: without
            it the maps are taken to cover the views in equal shares, 3.5 (layer2) to 7.5
            (layer3) voxels off for MONAI's ResNet.
        stride: voxels per cell (one number or one per axis); None: derived from
            ``view_shape`` and the map's shape.
        cells: where the encoder centres its cells (``"padded"`` or ``"patch"``,
            :func:`byol3d.models.stages.dense_cells`).

    Returns:
        ``dense_byol_loss(q1 at pts, z'2 at pts) + dense_byol_loss(q2 at pts, z'1 at pts)``,
        a float32 scalar in [0, 8].
    """
    n = geometry1["box"].shape[0]
    if p_maps.shape[0] != 2 * n or z_maps.shape[0] != 2 * n:
        raise ValueError(
            f"maps must hold 2 x {n} rows (view 1 then view 2), got {p_maps.shape[0]} and {z_maps.shape[0]}"
        )
    device = p_maps.device
    box1, box2 = geometry1["box"].to(device), geometry2["box"].to(device)
    points, valid = overlap_points(box1, box2, grid)
    coords = [
        source_to_view(points, g["box"].to(device), g.get("flip"), g.get("rot90"), spatial_axes)
        for g in (geometry1, geometry2)
    ]
    geo = {"view_shape": view_shape, "stride": stride, "cells": cells}
    return dense_byol_loss(
        p_maps[:n], z_maps[n:], coords[0], coords[1], valid, **geo
    ) + dense_byol_loss(p_maps[n:], z_maps[:n], coords[1], coords[0], valid, **geo)
