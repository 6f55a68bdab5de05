"""Where the dense term reads feature cells: the encoder's real geometry, measured.

MONAI's ResNet (conv1 stride 2, maxpool, layer2..4 stride 2, all padded odd kernels) centres
cell ``j`` of a map with total stride ``s`` on input voxel ``s * j``. These tests measure that
with input gradients on byol3d's resnet10 (2D and 3D) and check the mapping of
:mod:`byol3d.models.correspondence` against it, then read partners in a flipped and turned
view end to end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from byol3d.models.correspondence import (
    cells_to_view,
    feature_stride,
    source_to_view,
    view_to_cells,
)
from byol3d.models.dense import dense_term, sample_map
from byol3d.models.encoders import build_encoder

STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
RADIUS = {"layer2": 25, "layer3": 49}  # resnet10 receptive-field half-widths, input voxels


def layer_maps(net: nn.Module, x: torch.Tensor, layers) -> list[torch.Tensor]:
    """One forward of ``net``; the outputs of ``layers``."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        getattr(net, name).register_forward_hook(
            lambda _m, _i, o, name=name: out.__setitem__(name, o)
        )
        for name in layers
    ]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return [out[name] for name in layers]


# --- the stride ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "view, cells, stride",
    [(128, 8, 16), (128, 16, 8), (36, 3, 16), (18, 2, 16), (100, 13, 8), (64, 64, 1), (7, 1, 8)],
)
def test_feature_stride_inverts_the_ceil_division_of_stride_2_stages(view, cells, stride):
    assert feature_stride(view, cells) == stride


def test_feature_stride_refuses_maps_no_stride_2_chain_gives():
    with pytest.raises(ValueError, match="stride"):
        feature_stride(12, 5)  # 12 -> 6 -> 3: never 5
    with pytest.raises(ValueError, match="stride"):
        feature_stride(10, 20)


@pytest.mark.parametrize("spatial_dims, sizes", [(2, (36, 50, 64, 77)), (3, (36, 41))])
def test_feature_stride_matches_the_encoders_maps_for_any_view_size(spatial_dims, sizes):
    enc = build_encoder("resnet10", spatial_dims=spatial_dims).eval()
    for size in sizes:
        with torch.no_grad():
            maps = layer_maps(enc, torch.zeros(1, 1, *(size,) * spatial_dims), list(STRIDES))
        for name, fmap in zip(STRIDES, maps, strict=True):
            assert feature_stride(size, fmap.shape[2]) == STRIDES[name], (size, name)


# --- receptive-field centres ----------------------------------------------------------------


def gradient_centres(spatial_dims: int, size: int, seeds, batch: int):
    """Per layer (layer2, layer3): the middle cell's index and the centre of mass of |d cell /
    d input| per axis (voxel-index coordinates), averaged over randomly initialised networks
    (eval mode) and random inputs."""
    layers = ("layer2", "layer3")
    sums = {name: torch.zeros(spatial_dims, dtype=torch.float64) for name in layers}
    cells = {}
    for seed in seeds:
        torch.manual_seed(seed)
        enc = build_encoder("resnet10", spatial_dims=spatial_dims).eval()
        x = torch.randn(batch, 1, *(size,) * spatial_dims, requires_grad=True)
        maps = layer_maps(enc, x, layers)
        for name, fmap in zip(layers, maps, strict=True):
            j = fmap.shape[2] // 2
            cells[name] = (j, tuple(fmap.shape[2:]))
            cell = fmap[(slice(None), slice(None), *(j,) * spatial_dims)].sum()
            (grad,) = torch.autograd.grad(cell, x, retain_graph=True)
            g = grad.abs().sum(dim=(0, 1)).double()
            for a in range(spatial_dims):
                marginal = g.sum(dim=tuple(b for b in range(spatial_dims) if b != a))
                sums[name][a] += (marginal * torch.arange(size)).sum() / marginal.sum()
    return {name: (cells[name], sums[name] / len(seeds)) for name in layers}


@pytest.mark.parametrize(
    "spatial_dims, size, seeds, batch",
    [(2, 128, range(8), 4), (3, 96, range(3), 1)],
    ids=["2d", "3d"],
)
def test_cells_are_mapped_to_their_measured_receptive_field_centres(
    spatial_dims, size, seeds, batch
):
    """Backprop one cell of layer2/layer3, take the centre of mass of |grad| on the input: it
    is within 0.5 voxel of the point view_to_cells assigns to that cell (per network the centre
    scatters by about 0.3 voxel with the random weights, hence the mean over networks), and
    3.5 to 7.5 voxels from the (j + 0.5) / n rule."""
    view_shape = (size,) * spatial_dims
    for name, ((j, map_shape), measured) in gradient_centres(
        spatial_dims, size, seeds, batch
    ).items():
        cell = torch.full((1, spatial_dims), float(j))
        mapped = cells_to_view(cell, view_shape, map_shape)[0].double() * size - 0.5
        old = torch.full((spatial_dims,), (j + 0.5) / map_shape[0] * size - 0.5)
        assert torch.allclose(mapped, torch.full_like(mapped, STRIDES[name] * j))
        assert (measured - mapped).abs().max() < 0.5, (name, measured.tolist(), mapped.tolist())
        assert (measured - old).abs().min() > 3.0, (name, measured.tolist(), old.tolist())
        back = view_to_cells((mapped.float() + 0.5)[None] / size, view_shape, map_shape)
        assert torch.allclose(back, cell)


# --- partners in a flipped, turned view ---------------------------------------------------


def symmetric_encoder(spatial_dims: int, seed: int = 0) -> nn.Module:
    """resnet10 whose kernels are symmetric under every axis flip and under swapping axes 0 and
    1: the network commutes with flips and quarter turns in (0, 1) (on matching cell grids)."""
    torch.manual_seed(seed)
    enc = build_encoder("resnet10", spatial_dims=spatial_dims).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                w = m.weight
                for a in range(2, 2 + spatial_dims):
                    w = (w + w.flip(a)) / 2
                m.weight.copy_((w + w.transpose(2, 3)) / 2)
    return enc


@pytest.mark.parametrize(
    "spatial_dims, size, layers",
    [(2, 160, ("layer2", "layer3")), (3, 80, ("layer2",))],
    ids=["2d", "3d"],
)
def test_partners_in_a_flipped_and_turned_view_read_the_same_features(spatial_dims, size, layers):
    """View 1 is the source crop [0, size); view 2 a crop shifted by one voxel on the axes it
    reverses, flipped and turned, so both views' cell grids land on the same source voxels.
    For a flip- and turn-equivariant network the features at those voxels are equal in the two
    views: read through source_to_view and the real cell geometry they agree to float
    precision (measured: 1e-6 of their norm); read with the old equal-shares rule they differ
    by about half the typical difference between cells."""
    dims = spatial_dims
    flip = torch.tensor([[1] + [0] * (dims - 2) + [1]])  # axes 0 and last
    k = 1  # one quarter turn in (0, 1): (u0, u1) -> (1 - u1, u0) reverses source axis 1 too
    reversed_axes = flip[0].clone()
    reversed_axes[1] ^= 1
    torch.manual_seed(3)
    source = torch.randn(1, 1, *(size + 1,) * dims)
    box1 = torch.tensor([[[0, size]] * dims])
    box2 = torch.tensor([[[int(r), int(r) + size] for r in reversed_axes]])
    view1 = source[(..., *(slice(0, size),) * dims)]
    view2 = source[(..., *(slice(int(r), int(r) + size) for r in reversed_axes))]
    view2 = torch.rot90(view2.flip([2 + a for a in range(dims) if flip[0, a]]), k, (2, 3))
    with torch.no_grad():
        maps = layer_maps(symmetric_encoder(dims), torch.cat([view1, view2]), layers)
    view_shape = (size,) * dims
    for name, fmap in zip(layers, maps, strict=True):
        s, radius = STRIDES[name], RADIUS[name]
        inner = [j for j in range(fmap.shape[2]) if s * j - radius >= 1 and s * j + radius < size]
        assert len(inner) >= 2
        grid = torch.meshgrid(*[torch.tensor(inner, dtype=torch.float32)] * dims, indexing="ij")
        points = (torch.stack(grid, -1).reshape(1, -1, dims) * s) + 0.5  # voxel centres s * j
        c1 = source_to_view(points, box1)
        c2 = source_to_view(points, box2, flip, torch.tensor([k]))
        f1 = sample_map(fmap[:1], c1, view_shape)
        f2 = sample_map(fmap[1:], c2, view_shape)
        scale = f1.norm(dim=1).mean()
        assert (f1 - f2).norm(dim=1).max() < 1e-4 * scale, name
        o1, o2 = sample_map(fmap[:1], c1), sample_map(fmap[1:], c2)  # equal shares
        spread = (f1 - f1.mean(dim=2, keepdim=True)).norm(dim=1).mean()  # cell-to-cell
        assert (o1 - o2).norm(dim=1).mean() > 0.25 * spread, name


def test_dense_term_with_the_view_shape_reads_cells_where_the_encoder_puts_them():
    """Toy stride-8 maps whose cells hold the source coordinate of their centre (an
    equivariant feature: the same at the same anatomy in any view). View 2 is view 1 flipped
    on axis 0; its cell j sits on view voxel 8 j, i.e. source voxel 63 - 8 j, so its map is not
    the array flip of view 1's. dense_term with view_shape pairs equal features (loss 0);
    without it the partners are (s - 1) / 2 voxels off in each view."""
    size, n = 64, 8
    centre = torch.arange(n, dtype=torch.float32) * 8 + 0.5  # cell j's centre, view voxels
    _, other = torch.meshgrid(centre, centre / size, indexing="ij")

    def coordinate_map(source_axis0):
        rows, _ = torch.meshgrid(source_axis0 / size, centre, indexing="ij")
        return torch.stack([rows - 0.5, other, torch.ones(n, n)])[None]

    view1 = coordinate_map(centre)
    view2 = coordinate_map(size - centre)  # source coordinate under view 2's cells
    assert not torch.allclose(view2, view1.flip(2))
    box = torch.tensor([[[0, size], [0, size]]])
    g1 = {"box": box, "flip": torch.zeros(1, 2)}
    g2 = {"box": box, "flip": torch.tensor([[1, 0]])}
    maps = torch.cat([view1, view2])
    exact = dense_term(maps, maps, g1, g2, grid=4, view_shape=(size, size))
    assert exact.item() == pytest.approx(0.0, abs=1e-5)
    assert dense_term(maps, maps, g1, g2, grid=4).item() > 1e-3
