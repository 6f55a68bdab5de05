"""Batched views, device side: a batch of boxes and parameters in, BYOL's two views out.

:func:`make_views` takes a batch collated by :func:`byol3d.transforms.batched.collate_boxes`
and, for the whole batch at once, on any device (the GPU, or the CPU in the DataLoader
workers through :class:`MakeViewsCollate`), makes what
:func:`byol3d.transforms.volume_views.view_transforms` makes one sample at a time, in its order:

1. on a GPU, crop-resize-flip-rot90 in one ``affine_grid`` + ``grid_sample`` (trilinear,
   ``align_corners=False``, border clamping) per patch: :func:`view_affine` composes the
   resize of the box to ``roi_size`` (as ``F.interpolate`` maps it), the recorded flips and
   the recorded quarter turns (as ``torch.flip`` and ``torch.rot90(k, (0, 1))`` move voxels),
   so the view equals the CPU path's view of the same box up to float rounding; on a CPU,
   where ``grid_sample`` is slow, those three ops themselves;
2. gamma on the view's min-max range (MONAI's ``AdjustContrast``) and the intensity scale
   and shift, in one multiply-add;
3. a separable Gaussian blur with per-sample, per-axis sigma (MONAI's ``gaussian_1d`` kernels,
   truncated at 4 sigma, zero padding as ``RandGaussianSmoothd``): on a GPU one shift-and-add
   pass per axis over the blurred samples together, on a CPU one sample at a time with its
   own kernel width and no padded copies;
4. Gaussian noise from ``torch.randn`` on the device, seeded per sample (the seed drawn on
   the CPU with the other parameters), so a view does not depend on its batch.

A batch of 2D frames (:class:`byol3d.transforms.batched.FrameBoxViewsd`, recognised by its
``{view}_jitter`` draws) takes the order of :func:`byol3d.transforms.frames.frame_views`
instead: step 1 (bilinear; flips, no turns), then uint8 to [0, 1], and
:func:`_frame_colour`: colour jitter in each sample's drawn order, grayscale, blur (reflected
borders), solarize, all with kornia's functions on the sub-batch of samples an op fired for,
and the ``(x - mean) / std`` normalisation.

>>> import torch
>>> from byol3d.transforms.batched import BoxViewsd, collate_boxes
>>> draw = BoxViewsd(roi_size=(32, 32, 32)).set_random_state(seed=0)
>>> batch = collate_boxes([draw({"image": torch.rand(1, 60, 50, 40)}) for _ in range(2)])
>>> out = make_views(batch, (32, 32, 32), "cpu")
>>> out["view1"].shape, out["view2_box"].shape
(torch.Size([2, 1, 32, 32, 32]), torch.Size([2, 3, 2]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
    solarize,
)
from monai.networks.layers import gaussian_1d

from byol3d.transforms.batched import PATCH_SUFFIX, collate_boxes
from byol3d.transforms.crops import check_roi
from byol3d.transforms.photometric import SOLARIZE_THRESHOLD

__all__ = ["MakeViewsCollate", "make_views", "view_affine", "RECORDS"]

#: The per-view geometry records a made batch keeps (what the dense term reads).
RECORDS = ("box", "flip", "rot90")
_PARAMS = ("gamma", "scale", "shift", "sigma", "noise_std", "noise_seed")
#: The draws of a 2D frame view (:class:`~byol3d.transforms.batched.FrameBoxViewsd`).
_FRAME_PARAMS = ("jitter", "jitter_order", "grayscale", "sigma", "solarize", "mean", "std")


def view_affine(
    flip: torch.Tensor, rot90: int, spatial_axes: Sequence[int] = (0, 1)
) -> torch.Tensor:
    """The ``affine_grid`` matrix of one view: output coordinates -> its box's coordinates.

    In normalised coordinates (``align_corners=False``: -1..1 over the voxel edges, which is
    how ``F.interpolate`` maps a box onto ``roi_size``) and array axis order, the final view at
    ``v`` shows the rotated view at ``z = M^k v`` (one quarter turn of ``torch.rot90(., 1, (a,
    b))`` maps ``(v_a, v_b) -> (v_b, -v_a)``) and the flipped view at ``x = D z`` (``D =
    diag(+-1)``), which is the box at ``x``. ``grid_sample`` wants the last array axis first,
    so rows and columns are reversed.

    Args:
        flip: ``(spatial_dims,)`` 0/1.
        rot90: quarter turns k in the plane ``spatial_axes``.

    Returns:
        ``(spatial_dims, spatial_dims + 1)`` float32 ``theta`` for ``F.affine_grid``.
    """
    dims = int(flip.shape[0])
    a, b = (int(s) % dims for s in spatial_axes)
    quarter = torch.eye(dims, dtype=torch.float64)
    quarter[a, a], quarter[a, b], quarter[b, b], quarter[b, a] = 0.0, 1.0, 0.0, -1.0
    turn = torch.linalg.matrix_power(quarter, int(rot90) % 4)
    linear = torch.diag(1.0 - 2.0 * torch.as_tensor(flip, dtype=torch.float64)) @ turn
    theta = torch.cat([linear.flip(0).flip(1), torch.zeros(dims, 1, dtype=torch.float64)], dim=1)
    return theta.to(torch.float32)


def _resize_flip_turn(patch: torch.Tensor, roi, flip, k: int, out: torch.Tensor) -> None:
    """The CPU kernel of step 1: ``F.interpolate``, then the flips and the turn, into ``out``.

    On a CPU these are about 5x faster than ``affine_grid`` + ``grid_sample`` (which PyTorch
    does not vectorise there); they compute the same view. ``torch.rot90(., k, (1, 2))`` is a
    flip of axis 2 (k = 1), of axes 1 and 2 (k = 2) or of axis 1 (k = 3), then for odd k a
    transpose of axes 1 and 2; so the recorded flips and the turn are one ``torch.flip`` (of
    the axes flipped an odd number of times) and a transposed read into ``out``.
    """
    x = patch.float()
    if tuple(x.shape[1:]) != tuple(roi):
        mode = ("bilinear", "trilinear")[len(roi) - 2]
        x = F.interpolate(x[None], size=roi, mode=mode, align_corners=False)[0]
    axes = {a + 1 for a, f in enumerate(flip.tolist()) if f} ^ _TURN_FLIPS[k % 4]
    x = torch.flip(x, sorted(axes)) if axes else x
    out.copy_(x.transpose(1, 2) if k % 2 else x)


#: The axes of a channel-first view that ``torch.rot90(., k, (1, 2))`` flips before its transpose.
_TURN_FLIPS = (set(), {2}, {1, 2}, {1})


def _resample(batch: Mapping[str, Any], key: str, roi, device, grid_sample: bool) -> torch.Tensor:
    """Step 1 for one view key: ``(B, C, *roi)`` float32 on ``device``."""
    patches = batch[key + PATCH_SUFFIX]
    if not grid_sample:  # each view written into the batch: no per-sample copies to concatenate
        out = torch.empty(len(patches), patches[0].shape[0], *roi, device=device)
        for i, patch in enumerate(patches):
            p = torch.as_tensor(patch).to(device, non_blocking=True)
            flip, k = batch[f"{key}_flip"][i], int(batch[f"{key}_rot90"][i])
            _resize_flip_turn(p, roi, flip, k, out[i])
        return out
    out = []
    for i, patch in enumerate(patches):
        p = torch.as_tensor(patch).to(device, non_blocking=True)
        theta = view_affine(batch[f"{key}_flip"][i], int(batch[f"{key}_rot90"][i])).to(device)
        grid = F.affine_grid(theta[None], [1, p.shape[0], *roi], align_corners=False)
        out.append(F.grid_sample(p[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False))  # fmt: skip
    return torch.cat(out)


def _per_sample(values, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values as ``(B, 1, 1, ...)`` on ``x``'s device, to broadcast over a sample."""
    v = torch.as_tensor(values).to(x.device, torch.float32, non_blocking=True, copy=True)
    return v.reshape(-1, *[1] * (x.ndim - 1))  # a copy: callers write into it


def _intensity(x: torch.Tensor, gamma, scale, shift) -> torch.Tensor:
    """Step 2, in place: gamma on the samples with gamma > 0, then ``* scale + shift``.

    A gamma'd sample becomes ``t^g * (span * scale) + (low * scale + shift)`` with ``t`` its
    min-max-normalised values (MONAI's ``AdjustContrast``, epsilon 1e-7, then the jitter).
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float32)
    mul, add = _per_sample(scale, x), _per_sample(shift, x)
    for i in torch.nonzero(gamma > 0).flatten().tolist():
        v = x[i]
        low, high = torch.aminmax(v)
        span = high - low
        v.sub_(low).div_(span + 1e-7).pow_(float(gamma[i]))
        mul[i], add[i] = span * mul[i], low * mul[i] + add[i]
    return x.mul_(mul).add_(add)


def _kernel(sigma: float) -> torch.Tensor:
    """One axis's centred float32 kernel: MONAI's ``gaussian_1d`` (4 sigma, erf); delta for 0."""
    if sigma <= 0:
        return torch.ones(1)
    return gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").float()


def _kernels(sigma: torch.Tensor) -> torch.Tensor:
    """``(n, spatial_dims)`` sigmas -> ``(n, spatial_dims, K)`` centred kernels (delta for 0)."""
    rows = [[_kernel(float(s)) for s in sample] for sample in sigma.to(torch.float32)]
    width = max(k.numel() for row in rows for k in row)
    out = torch.zeros(sigma.shape[0], sigma.shape[1], width)
    for i, row in enumerate(rows):
        for a, k in enumerate(row):
            pad = (width - k.numel()) // 2
            out[i, a, pad : pad + k.numel()] = k
    return out


def _blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Step 3: per-sample separable Gaussian blur (zero padding) of the samples with sigma > 0.

    On a GPU (:func:`_blur_batched`), one pass per axis over the blurred samples together: the
    zero-padded samples shifted by each tap, times that tap's per-sample weight, summed
    (``addcmul_``), a few large kernels. On a CPU, :func:`_blur_cpu`: one sample at a time.
    Either is the grouped convolution MONAI's filter runs, up to float rounding.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    idx = torch.nonzero((sigma > 0).any(dim=1)).flatten()
    if idx.numel() == 0:
        return x
    if x.device.type == "cpu":
        return _blur_cpu(x, sigma, idx.tolist())
    return _blur_batched(x, sigma, idx)


def _blur_batched(x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Step 3 on a GPU, in place: the samples ``idx`` together, padded to the widest kernel."""
    kernels = _kernels(sigma[idx]).to(x.device, non_blocking=True)  # (n, dims, K)
    n, dims, width = kernels.shape
    y = x[idx.to(x.device)]
    for axis in range(dims):
        d = axis + 2
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = width // 2
        padded, size = F.pad(y, pad), y.shape[d]
        w = kernels[:, axis].reshape(n, *[1] * (y.ndim - 1), width)
        y = padded.narrow(d, 0, size) * w[..., 0]
        for j in range(1, width):
            y.addcmul_(padded.narrow(d, j, size), w[..., j])
    x[idx.to(x.device)] = y
    return x


def _blur_cpu(x: torch.Tensor, sigma: torch.Tensor, samples: Sequence[int]) -> torch.Tensor:
    """Step 3 on a CPU, in place: one sample and one axis at a time, each with its own kernel.

    Every tap adds the sample shifted by the tap's offset, times the tap's weight, into the
    part of the output it overlaps: zero padding without a padded copy, and no taps beyond
    the sample's own kernel (the batched pass runs every sample to the widest kernel). Two
    buffers the size of one sample take turns as input and output, so no allocation is
    repeated (on a CPU, fresh large tensors cost page faults that outweigh the arithmetic).
    """
    spare = torch.empty_like(x[0])
    for i in samples:
        view = src = x[i]
        dst = spare
        for axis, s in enumerate(sigma[i].tolist()):
            if s > 0:
                _correlate(src, dst, _kernel(s), axis + 1)
                src, dst = dst, src
        if src is not view:
            view.copy_(src)
    return x


def _correlate(src: torch.Tensor, dst: torch.Tensor, kernel: torch.Tensor, dim: int) -> None:
    """``dst = src`` correlated with an odd centred ``kernel`` along ``dim``, zero padding."""
    size, r = src.shape[dim], kernel.numel() // 2
    weights = kernel.tolist()
    torch.mul(src, weights[r], out=dst)
    for j, w in enumerate(weights):
        o, n = j - r, size - abs(j - r)
        if o != 0 and n > 0:
            dst.narrow(dim, max(-o, 0), n).add_(src.narrow(dim, max(o, 0), n), alpha=w)


def _noise(x: torch.Tensor, std, seeds) -> torch.Tensor:
    """Step 4: ``x + std * N(0, 1)`` per sample with noise, from a generator seeded per sample."""
    std = torch.as_tensor(std, dtype=torch.float32)
    for i in torch.nonzero(std > 0).flatten().tolist():
        gen = torch.Generator(device=x.device).manual_seed(int(seeds[i]))
        noise = torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)
        x[i].add_(noise, alpha=float(std[i]))
    return x


def make_views(
    batch: Mapping[str, Any],
    roi_size: Sequence[int],
    device: torch.device | str = "cpu",
    view_keys: Sequence[str] = ("view1", "view2"),
    memory_format: torch.memory_format | None = None,
    grid_sample: bool | None = None,
) -> dict[str, Any]:
    """The two views of a batch of :class:`~byol3d.transforms.batched.BoxViewsd` samples.

    A batch of :class:`~byol3d.transforms.batched.FrameBoxViewsd` samples (2D frames) gets
    the frame steps of the module docstring instead of the intensity, blur and noise steps.

    Args:
        batch: the output of :func:`~byol3d.transforms.batched.collate_boxes` (on the CPU;
            pinned patches make the copies to a GPU asynchronous).
        roi_size: the views' spatial size.
        device: where the views are made (and left).
        view_keys: the two views' keys.
        memory_format: e.g. ``torch.channels_last_3d`` for a channels-last model.
        grid_sample: resample with ``affine_grid``/``grid_sample`` (True) or with
            ``interpolate``/``flip``/``rot90`` (False); None: grid_sample except on a CPU.

    Returns:
        ``{view: (B, C, *roi_size) float32 on device, f"{view}_box"/"_flip"/"_rot90": the
        records}`` plus any other keys of ``batch`` (the patches and draws are dropped).
    """
    roi, device = check_roi(roi_size), torch.device(device)
    grid_sample = device.type != "cpu" if grid_sample is None else bool(grid_sample)
    dropped = {f"{k}{PATCH_SUFFIX}" for k in view_keys} | {f"{k}_{p}" for k in view_keys for p in _PARAMS}  # fmt: skip
    dropped |= {f"{k}_{p}" for k in view_keys for p in _FRAME_PARAMS}
    out = {k: v for k, v in batch.items() if k not in dropped}
    for key in view_keys:
        x = _resample(batch, key, roi, device, grid_sample)
        if f"{key}_jitter" in batch:  # 2D frames: colour ops, then the normalisation
            x = _frame_colour(x, batch, key)
            out[key] = x if memory_format is None else x.contiguous(memory_format=memory_format)
            continue
        x = _intensity(x, batch[f"{key}_gamma"], batch[f"{key}_scale"], batch[f"{key}_shift"])
        x = _blur(x, batch[f"{key}_sigma"])
        x = _noise(x, batch[f"{key}_noise_std"], batch[f"{key}_noise_seed"])
        out[key] = x if memory_format is None else x.contiguous(memory_format=memory_format)
    return out


def _where(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The indices of the ``True`` samples of a ``(B,)`` mask, on ``device``."""
    return torch.nonzero(mask).flatten().to(device)


def _jitter(x: torch.Tensor, factors, order) -> torch.Tensor:
    """torchvision's ``ColorJitter`` per sample, in place: the four adjustments in its order.

    ``factors`` ``(B, 4)``: brightness, contrast, saturation, hue (``[1, 1, 1, 0]``: off),
    ``order`` ``(B, 4)``: a permutation of 0..3 per sample. In each of the four slots, each
    adjustment runs once on the samples that have it there (kornia, per-sample factors), as
    :class:`~byol3d.transforms.photometric.RandColorJitterd` runs it on one image; an
    adjustment with an identity factor is skipped as there, saturation and hue on RGB only,
    and the jittered samples are clamped to [0, 1] at the end.
    """
    ops = (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
           adjust_saturation_with_gray_subtraction, adjust_hue)  # fmt: skip
    factors = torch.as_tensor(factors, dtype=torch.float64)
    order = torch.as_tensor(order)
    active = factors != torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    for slot in range(4):
        for op in range(4 if x.shape[1] == 3 else 2):
            idx = torch.nonzero((order[:, slot] == op) & active[:, op]).flatten()
            if idx.numel() == 0:
                continue
            f = factors[idx, op] * (2 * math.pi if op == 3 else 1.0)  # hue: a turn in radians
            at = idx.to(x.device)
            x[at] = ops[op](x[at], f.to(x.device, torch.float32))
    jittered = _where(active.any(dim=1), x.device)
    if jittered.numel():
        x[jittered] = x[jittered].clamp(0.0, 1.0)
    return x


def _blur_reflect(x: torch.Tensor, sigma) -> torch.Tensor:
    """Per-sample separable Gaussian blur with reflected borders, of the samples with sigma > 0.

    What :class:`~byol3d.transforms.photometric.RandGaussianBlurd` does to one image (MONAI's
    ``gaussian_1d`` kernels of :func:`_kernels`, truncated at 4 sigma, or shortened to a
    radius of ``min(size) - 1`` when that reaches the image's border, reflection as
    torchvision pads): one grouped convolution per axis over the blurred samples.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    idx = torch.nonzero((sigma > 0).any(dim=1)).flatten()
    if idx.numel() == 0:
        return x
    kernels = _kernels(sigma[idx])  # (n, dims, K)
    radius, limit = kernels.shape[-1] // 2, min(x.shape[2:]) - 1
    if radius > limit:  # the central taps: gaussian_1d's kernel truncated at that radius
        kernels = kernels[..., radius - limit : radius + limit + 1]
        radius = limit
    at, (n, c), dims = idx.to(x.device), (int(idx.numel()), x.shape[1]), x.ndim - 2
    y = x[at].reshape(1, n * c, *x.shape[2:])
    kernels = kernels.to(x.device, non_blocking=True).repeat_interleave(c, dim=0)  # (n*c, dims, K)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    for axis in range(dims):
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        shape = [n * c, 1] + [1] * dims
        shape[axis + 2] = -1
        y = conv(F.pad(y, pad, mode="reflect"), kernels[:, axis].reshape(shape), groups=n * c)
    x[at] = y.reshape(n, c, *x.shape[2:])
    return x


def _frame_colour(x: torch.Tensor, batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """The 2D steps after crop-resize-flip, in :func:`~byol3d.transforms.frames.frame_views`' order.

    uint8 patches to [0, 1] (``/ 255``, as its first step), colour jitter, grayscale (ITU-R
    601 luma on the three channels), blur, solarize at
    :data:`~byol3d.transforms.photometric.SOLARIZE_THRESHOLD`, then ``(x - mean) / std`` per
    channel (``NormalizeIntensityd``).
    """
    unit = [1.0 if p.is_floating_point() else 255.0 for p in batch[key + PATCH_SUFFIX]]
    x = x.div_(_per_sample(unit, x))
    x = _jitter(x, batch[f"{key}_jitter"], batch[f"{key}_jitter_order"])
    grey = _where(torch.as_tensor(batch[f"{key}_grayscale"]) > 0, x.device)
    if grey.numel() and x.shape[1] == 3:
        x[grey] = rgb_to_grayscale(x[grey]).expand(-1, 3, *x.shape[2:])
    x = _blur_reflect(x, batch[f"{key}_sigma"])
    solar = _where(torch.as_tensor(batch[f"{key}_solarize"]) > 0, x.device)
    if solar.numel():
        x[solar] = solarize(x[solar], thresholds=SOLARIZE_THRESHOLD)
    shape = (x.shape[0], -1, *[1] * (x.ndim - 2))
    mean = torch.as_tensor(batch[f"{key}_mean"]).to(x.device, torch.float32).reshape(shape)
    std = torch.as_tensor(batch[f"{key}_std"]).to(x.device, torch.float32).reshape(shape)
    return x.sub_(mean).div_(std)


class MakeViewsCollate:
    """A DataLoader ``collate_fn``: :func:`collate_boxes`, then :func:`make_views` on the CPU.

    The all-CPU path of ``transforms.views: batched``: the same batched code as on the GPU,
    run in the worker processes, so batches arrive with ``view1``/``view2`` (and their
    geometry records) ready. A class, so that it pickles into worker processes.
    """

    def __init__(self, roi_size: Sequence[int], view_keys: Sequence[str] = ("view1", "view2")):
        self.roi_size = check_roi(roi_size)
        self.view_keys = tuple(view_keys)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return make_views(collate_boxes(samples), self.roi_size, "cpu", self.view_keys)
