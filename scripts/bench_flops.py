"""FLOPs of a BYOL step (torch.utils.flop_counter), the card's peak and the single-conv roof."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), by name part.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "GH200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.05,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}


def card_peak(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak TFLOP/s or None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return name, peak
    return name, None


def step_flops(model, v1: torch.Tensor, v2: torch.Tensor) -> int:
    """FLOPs of one BYOL step: online forward + backward on both views, target forward."""
    with FlopCounterMode(display=False) as counter:
        loss = model(v1, v2)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def largest_conv(
    net: nn.Module, x: torch.Tensor, min_in_channels: int = 64
) -> tuple[nn.Module, torch.Size, int]:
    """The convolution with the most forward FLOPs on input ``x`` among those with at least
    ``min_in_channels`` input channels: (module, input shape, FLOPs).

    At 128^3 the 1-channel 7^3 stem has the most FLOPs, but it maps poorly onto tensor cores
    (one input channel); the roof is the best a real body convolution reaches. When no
    convolution has that many input channels, the largest of all is taken.
    """
    found = []

    def hook(m, inp, out):
        k = 1
        for s in m.kernel_size:
            k *= s
        flops = 2 * out.numel() * (m.in_channels // m.groups) * k
        found.append((flops, m, inp[0].shape))

    handles = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    wide = [f for f in found if f[1].in_channels >= min_in_channels] or found
    flops, module, shape = max(wide, key=lambda f: f[0])
    return module, shape, flops


def conv_roof(
    module: nn.Module,
    shape: torch.Size,
    forward_flops: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    fmt: torch.memory_format,
    repeats: int = 5,
) -> float:
    """TFLOP/s of that convolution alone, forward + backward (3x the forward FLOPs), same precision."""
    conv = type(module)(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        bias=module.bias is not None,
    ).to(device, memory_format=fmt)
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(True)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )

    def once():
        with autocast:
            y = conv(x)
        y.backward(torch.ones_like(y))

    once()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return 3 * forward_flops / statistics.median(times) / 1e12
