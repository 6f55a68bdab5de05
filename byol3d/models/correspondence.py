"""TODO docstring for models.correspondence."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_box(box: torch.Tensor) -> None:
    if box.ndim != 3 or box.shape[-1] != 2 or box.shape[1] not in (2, 3):
        raise ValueError(
            f"box must have shape (batch, spatial_dims, 2) with spatial_dims 2 or 3, got {tuple(box.shape)}"
        )


def source_to_view(
    points: torch.Tensor,
    box: torch.Tensor,
    flip: torch.Tensor | None = None,
    rot90: torch.Tensor | None = None,
    spatial_axes: Sequence[int] = (0, 1),
) -> torch.Tensor:
    """Map source voxel coordinates to a view's normalised coordinates, exactly.

    The view was made by cropping ``box`` out of the source and resizing it (linear
    interpolation with ``align_corners=False``, which scales edge coordinates exactly), then
    flipping the axes marked in ``flip``, then rotating by ``torch.rot90(view, k, spatial_axes)``.
    The same steps applied to coordinates: ``u = (x - start) / (stop - start)``; ``u -> 1 - u``
    on flipped axes; each quarter turn maps ``(u_a, u_b) -> (1 - u_b, u_a)`` on the axes
    ``(a, b) = spatial_axes``.

    Args:
        points: ``(B, P, spatial_dims)`` continuous source coordinates (voxel i spans [i, i+1)).
        box: ``(B, spatial_dims, 2)`` crop boxes, ``[start, stop)`` per axis (``{view}_box``).
        flip: ``(B, spatial_dims)`` 0/1 (``{view}_flip``); None: no flips.
        rot90: ``(B,)`` quarter turns k (``{view}_rot90``); None: no rotation.
        spatial_axes: the rotation plane, as given to ``RandRotate90d``.

    Returns:
        ``(B, P, spatial_dims)`` float32 coordinates in the view, 0..1 over each axis (outside
        [0, 1] for points outside the box). ``grid_sample(view, (2 * u - 1).flip(-1), align_corners=False)``
        reads the view at those points (grid_sample wants the last axis first).
    """
    _check_box(box)
    dims = box.shape[1]
    if points.ndim != 3 or points.shape[0] != box.shape[0] or points.shape[-1] != dims:
        raise ValueError(
            f"points must have shape (batch {box.shape[0]}, P, spatial_dims {dims}), got {tuple(points.shape)}"
        )
    box = box.to(points.device, torch.float32)
    start, stop = box[..., 0].unsqueeze(1), box[..., 1].unsqueeze(1)
    u = (points.float() - start) / (stop - start)
    if flip is not None:
        f = flip.to(points.device).reshape(box.shape[0], 1, dims).bool()
        u = torch.where(f, 1.0 - u, u)
    if rot90 is not None:
        a, b = (int(s) % dims for s in spatial_axes)
        if a == b:
            raise ValueError(f"spatial_axes must name two different axes, got {spatial_axes!r}")
        k = rot90.to(points.device).reshape(-1, 1) % 4
        for turn in range(3):
            ua, ub = u[..., a], u[..., b]
            turned = u.clone()
            turned[..., a], turned[..., b] = 1.0 - ub, ua
            u = torch.where((k > turn).unsqueeze(-1), turned, u)
    return u


def overlap_points(
    box1: torch.Tensor, box2: torch.Tensor, grid: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """A regular ``grid``-per-axis set of points in the overlap of two crop boxes, per sample.

    The points are the centres of a ``grid ** spatial_dims`` subdivision of the intersection
    box (so they never lie on its border), in continuous source coordinates.

    Args:
        box1, box2: ``(B, spatial_dims, 2)`` ``[start, stop)`` boxes in the same source image.
        grid: points per axis (>= 1).

    Returns:
        ``(points, valid)``: points ``(B, grid ** spatial_dims, spatial_dims)`` float32, and
        valid ``(B,)`` bool, False where the boxes do not overlap (those rows hold finite
        placeholder points that must be ignored).

    >>> b1 = torch.tensor([[[0, 4], [0, 4]]]); b2 = torch.tensor([[[2, 6], [3, 9]]])
    >>> pts, ok = overlap_points(b1, b2, grid=1)
    >>> pts.tolist(), ok.tolist()
    ([[[3.0, 3.5]]], [True])
    """
    _check_box(box1)
    if box1.shape != box2.shape:
        raise ValueError(
            f"box1 and box2 differ in shape: {tuple(box1.shape)} and {tuple(box2.shape)}"
        )
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"invalid grid {grid!r}, must be a positive integer")
    b1, b2 = box1.float(), box2.to(box1.device).float()
    lo = torch.maximum(b1[..., 0], b2[..., 0])
    hi = torch.minimum(b1[..., 1], b2[..., 1])
    valid = (hi > lo).all(dim=1)
    hi = torch.maximum(hi, lo)  # empty overlaps collapse to a point, still finite
    dims = box1.shape[1]
    steps = (torch.arange(grid, dtype=torch.float32, device=box1.device) + 0.5) / grid
    frac = torch.stack(torch.meshgrid(*([steps] * dims), indexing="ij"), dim=-1).reshape(-1, dims)
    points = lo.unsqueeze(1) + frac.unsqueeze(0) * (hi - lo).unsqueeze(1)
    return points, valid
