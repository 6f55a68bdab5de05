"""Correspondence between two views: source points, their view coordinates, their feature cells.

Dense (local) BYOL compares two views of one image where they show the same anatomy. Three
coordinate systems are involved, and each step here maps one into the next exactly:

* **source** voxel coordinates, continuous: voxel ``i`` of an axis spans ``[i, i + 1)``, its
  centre is ``i + 0.5``. :func:`overlap_points` samples a regular grid in the overlap of two
  views' crop boxes (``{view}_box``, :class:`byol3d.transforms.crops.RandResizedCropd`).
* **view** coordinates, normalised: ``u`` in ``[0, 1]`` over each axis of the view (0 its
  first edge, 1 its last), ``grid_sample``'s ``align_corners=False`` convention after
  ``2 * u - 1``. :func:`source_to_view` undoes the crop-resize, the flips and the 90-degree
  turns recorded for the view.
* **feature-cell** indices, continuous: cell ``j`` of an encoder's feature map at ``j``.
  :func:`view_to_cells` uses the network's real geometry. In MONAI's ResNet every downsampling
  (conv1 7x7 stride 2 padding 3, maxpool 3x3 stride 2 padding 1, the first block of
  layer2..4: a 3x3 stride-2 padding-1 convolution and a 1x1 stride-2 shortcut) is a padded
  odd-kernel stride-2 stage, which centres its output cell ``j`` on its input cell ``2 * j``;
  composed, cell ``j`` of a map with total stride ``s`` is centred on view voxel ``s * j``
  (voxel index, i.e. edge coordinate ``s * j + 0.5``), not on ``(j + 0.5) * s - 0.5`` as an
  "each cell covers 1/n of the view" rule assumes (3.5 voxels off on layer2, 7.5 on layer3;
  under a flip the two views' errors add up to about 0.9 cell). Input gradients confirm it
  (``tests/models/test_dense_geometry.py``). The stride follows from the view and map sizes
  (:func:`feature_stride`); ``offset`` is there for encoders whose cells sit elsewhere.
  SegResNet and nnU-Net's plain-convolution encoder downsample the same way (``cells="padded"``).
  SwinUNETR's Swin encoder cuts the view into non-overlapping 2-voxel patches and merges 2 x 2
  (x 2) neighbours per stage: its cell ``j`` is the patch ``[s * j, s * (j + 1))``, centred
  on voxel ``s * j + (s - 1) / 2`` (``cells="patch"``); attention mixes tokens by content,
  but each token stays its patch's.

>>> import torch
>>> box = torch.tensor([[[0, 64], [0, 64]]])  # a 2D view of source voxels 0..63 per axis
>>> u = source_to_view(torch.tensor([[[16.5, 40.5]]]), box)  # centres of voxels 16 and 40
>>> view_to_cells(u, view_shape=(64, 64), map_shape=(8, 8))  # stride 8: on cells 2 and 5
tensor([[[2., 5.]]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def feature_stride(view_size: int, map_size: int) -> int:
    """The total stride of one axis of a feature map of byol3d's encoders.

    Each stride-2 stage of MONAI's ResNet is padded so that ``n`` voxels give ``ceil(n / 2)``
    cells, and such stages compose (``ceil(ceil(N / a) / b) == ceil(N / (a * b))``): a map of
    total stride ``s`` has ``ceil(N / s)`` cells for a view of ``N`` voxels, whether or not
    ``s`` divides ``N``. For ``map_size >= 2`` exactly one power of two ``s`` gives
    ``ceil(view_size / s) == map_size``; it is returned. A one-cell map has no position to
    resolve (any stride reads the same value); the smallest power of two ``>= view_size`` is
    returned. (``view_size / map_size`` would be wrong where ``s`` does not divide the view:
    36 voxels give 3 cells at stride 16, not 12.)

    Args:
        view_size: voxels of the view (the encoder's input) along the axis.
        map_size: cells of the feature map along the axis.

    Raises:
        ValueError: when no power-of-two stride fits (the map is larger than the view, or
            comes from a network that is not a chain of padded stride-2 stages: pass the
            stride explicitly to :func:`view_to_cells`).

    >>> feature_stride(128, 8), feature_stride(36, 3), feature_stride(64, 64)
    (16, 16, 1)
    """
    n, m = int(view_size), int(map_size)
    if n < 1 or m < 1:
        raise ValueError(
            f"view_size and map_size must be positive, got {view_size!r}, {map_size!r}"
        )
    if m == 1:
        return 1 << max(0, math.ceil(math.log2(n)))
    s = 1
    while -(-n // s) > m:
        s *= 2
    if -(-n // s) != m:
        raise ValueError(
            f"a feature map of {m} cells does not come from {n} voxels through stride-2 stages "
            "(no power-of-two stride s gives ceil(view_size / s) == map_size); pass stride"
        )
    return s


def _per_axis(name: str, value, dims: int) -> list[float]:
    values = [value] * dims if isinstance(value, (int, float)) else list(value)
    if len(values) != dims:
        raise ValueError(f"{name} must be a number or {dims} numbers, got {value!r}")
    return [float(v) for v in values]


CELL_RULES = ("padded", "patch")


def _cell_geometry(
    view_shape, map_shape, stride, offset, cells="padded"
) -> tuple[list[float], list[float]]:
    dims = len(map_shape)
    view = [int(v) for v in view_shape]
    if len(view) != dims:
        raise ValueError(
            f"view_shape {tuple(view_shape)} and map_shape {tuple(map_shape)} differ in length"
        )
    if stride is None:
        strides = [float(feature_stride(v, m)) for v, m in zip(view, map_shape, strict=True)]
    else:
        strides = _per_axis("stride", stride, dims)
        if any(s <= 0 for s in strides):
            raise ValueError(f"stride must be positive, got {stride!r}")
    if cells not in CELL_RULES:
        raise ValueError(f"invalid cells {cells!r}, must be one of {', '.join(CELL_RULES)}")
    offsets = _per_axis("offset", offset, dims)
    if cells == "patch":
        offsets = [o + (s - 1.0) / 2.0 for o, s in zip(offsets, strides, strict=True)]
    return strides, offsets


def view_to_cells(
    coords: torch.Tensor,
    view_shape: Sequence[int],
    map_shape: Sequence[int],
    stride: float | Sequence[float] | None = None,
    offset: float | Sequence[float] = 0.0,
    cells: str = "padded",
) -> torch.Tensor:
    """Continuous feature-cell indices of points given in a view's normalised coordinates.

    Cell ``j`` of a map with total stride ``s`` is centred on view voxel ``s * j + offset``
    (voxel index; ``offset`` is 0 for MONAI's ResNet, see the module docstring), so a point
    ``u`` (edge coordinate ``u * N``, voxel-index coordinate ``u * N - 0.5``) lies at cell
    ``c = (u * N - 0.5 - offset) / s``; integer ``c`` are cell centres.

    Args:
        coords: ``(..., spatial_dims)`` view coordinates in [0, 1] per axis
            (:func:`source_to_view`).
        view_shape: the view's spatial shape (the encoder's input), e.g. ``x.shape[2:]``.
        map_shape: the feature map's spatial shape.
        stride: voxels per cell, one number or one per axis; None: :func:`feature_stride`.
        offset: where cell 0 is centred, in view voxels (one number or one per axis).
        cells: ``"padded"`` (cell ``j`` on voxel ``s * j + offset``) or ``"patch"`` (on
            ``s * j + (s - 1) / 2 + offset``, the centre of its patch; Swin encoders).

    Returns:
        float32 cell indices, same shape as ``coords``.
    """
    dims = coords.shape[-1]
    if len(map_shape) != dims:
        raise ValueError(f"coords have {dims} axes but map_shape is {tuple(map_shape)}")
    strides, offsets = _cell_geometry(view_shape, map_shape, stride, offset, cells)
    view = torch.tensor([float(v) for v in view_shape], device=coords.device)
    s = torch.tensor(strides, device=coords.device)
    o = torch.tensor(offsets, device=coords.device)
    return (coords.float() * view - 0.5 - o) / s


def cells_to_view(
    index: torch.Tensor,
    view_shape: Sequence[int],
    map_shape: Sequence[int],
    stride: float | Sequence[float] | None = None,
    offset: float | Sequence[float] = 0.0,
    cells: str = "padded",
) -> torch.Tensor:
    """The inverse of :func:`view_to_cells`: view coordinates of continuous cell indices.

    >>> cells_to_view(torch.tensor([[2.0]]), view_shape=(64,), map_shape=(8,))  # voxel 16
    tensor([[0.2578]])
    """
    dims = index.shape[-1]
    if len(map_shape) != dims:
        raise ValueError(f"cells have {dims} axes but map_shape is {tuple(map_shape)}")
    strides, offsets = _cell_geometry(view_shape, map_shape, stride, offset, cells)
    view = torch.tensor([float(v) for v in view_shape], device=index.device)
    s = torch.tensor(strides, device=index.device)
    o = torch.tensor(offsets, device=index.device)
    return (index.float() * s + o + 0.5) / view


def upsample_to_voxels(fmap: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
    """Read a stride-``stride`` feature map at every voxel of a ``size`` grid.

    Cell ``j`` sits on voxel ``stride * j`` (MONAI's padded strided convolutions centre it
    there); voxels between cell centres are linearly interpolated, voxels past the last cell
    take its value.

    Args:
        fmap: ``(B, C, *cells)``.
        size: the voxel grid, one size per spatial axis.
        stride: voxels per cell.

    Returns:
        ``(B, C, *size)``.

    >>> f = torch.tensor([[[0.0, 1.0, 2.0]]])
    >>> upsample_to_voxels(f, [7], stride=2).tolist()
    [[[0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]]]
    """
    cells = fmap.shape[2:]
    spanned = [stride * (n - 1) + 1 for n in cells]  # voxel 0 .. stride*(n-1)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(cells)]
    up = F.interpolate(fmap, size=spanned, mode=mode, align_corners=True)
    pad = []
    for have, want in zip(reversed(spanned), reversed(list(size)), strict=True):
        pad += [0, max(0, want - have)]
    if any(pad):
        up = F.pad(up, pad, mode="replicate")
    return up[(..., *(slice(0, s) for s in size))]
