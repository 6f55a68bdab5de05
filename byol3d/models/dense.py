"""Dense (local) BYOL: the BYOL loss between the two views' feature maps, location by location.

Global BYOL compares one pooled vector per view. The crop boxes of the two views are known
(:mod:`byol3d.geometry`), so for every sample the region of the source image seen by both
views is known too, and so are the positions in each view's feature map that look at the
same anatomy. The dense term:

1. takes a spatial feature map of the encoder (``dense_layer``, e.g. ``layer3``) from the
   same forward pass as the global representation;
2. projects it with :class:`DenseHead` (1x1 convolutions: Conv-BN-ReLU-Conv, BYOL's MLP applied
   at every location) and, on the online side, a dense predictor of the same shape; the target
   side has EMA copies of the dense projector, updated with the rest of the target;
3. samples ``grid ** spatial_dims`` points on a regular grid in the overlap of the two boxes
   (:func:`byol3d.geometry.overlap_points`), maps them into each view
   (:func:`byol3d.geometry.source_to_view`, which undoes crop, flips and rotations) and reads
   the online prediction of view 1 and the target projection of view 2 there with
   ``grid_sample`` (linear, ``align_corners=False``), and symmetrically;
4. applies BYOL's ``2 - 2 cos`` per point and averages over the points of all samples whose
   boxes overlap; samples without overlap contribute nothing (all disjoint: the term is 0).

The total loss is ``global + dense_weight * dense``. Feature map cells are taken to cover
equal shares of the view (cell j of n spans [j/n, (j+1)/n)), the usual approximation for
strided ResNet features; the view geometry itself is mapped exactly.

>>> import torch
>>> p = torch.randn(2, 8, 4, 4, 4); z = torch.randn(2, 8, 4, 4, 4)
>>> grid = torch.zeros(2, 5, 3)            # 5 points at the centre of each map
>>> dense_byol_loss(p, z, grid, grid, torch.tensor([True, False])).shape
torch.Size([])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from byol3d.models.correspondence import overlap_points, source_to_view


def sample_map(fmap: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Read a feature map at normalised view coordinates, (multi)linearly.

    Args:
        fmap: ``(B, C, *spatial)`` feature map covering the whole view.
        coords: ``(B, P, spatial_dims)`` coordinates in [0, 1] per axis, in the map's axis order
            (as returned by :func:`byol3d.geometry.source_to_view`).

    Returns:
        ``(B, C, P)`` float32 values (``grid_sample``, ``align_corners=False``, border padding).
    """
    dims = fmap.ndim - 2
    if coords.ndim != 3 or coords.shape[-1] != dims or coords.shape[0] != fmap.shape[0]:
        raise ValueError(
            f"coords must have shape (batch {fmap.shape[0]}, P, {dims}) for a map of shape "
            f"{tuple(fmap.shape)}, got {tuple(coords.shape)}"
        )
    b, p = coords.shape[:2]
    grid = (2.0 * coords.float() - 1.0).flip(-1)  # grid_sample: x indexes the last axis
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
) -> torch.Tensor:
    """One direction of the dense loss: ``2 - 2 cos(p, sg(z))`` at corresponding points.

    Args:
        p_map: online predictions of one view, ``(B, D, *spatial)``.
        z_map: target projections of the other view, ``(B, D, *spatial')``; detached here.
        p_coords, z_coords: ``(B, P, spatial_dims)`` the same P source points in each view's
            normalised coordinates.
        valid: ``(B,)`` bool, False for samples whose views do not overlap.

    Returns:
        The mean over the points of valid samples (float32 scalar, in [0, 4]); 0 (still
        differentiable, with zero gradient) when no sample is valid.
    """
    p = F.normalize(sample_map(p_map, p_coords), dim=1)
    z = F.normalize(sample_map(z_map.detach(), z_coords), dim=1)
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
) -> torch.Tensor:
    """The symmetric dense loss of a batch of view pairs.

    Args:
        p_maps: online dense predictions, ``(2B, D, *spatial)``: view 1 of each sample, then view 2.
        z_maps: target dense projections, same layout.
        geometry1, geometry2: each view's ``{"box", "flip", "rot90"}`` (see
            :func:`byol3d.geometry.view_geometry`), ``box`` ``(B, spatial_dims, 2)``.
        grid: points per axis in each overlap.
        spatial_axes: the plane of the recorded 90-degree rotations.

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
    return dense_byol_loss(p_maps[:n], z_maps[n:], coords[0], coords[1], valid) + dense_byol_loss(
        p_maps[n:], z_maps[:n], coords[1], coords[0], valid
    )
