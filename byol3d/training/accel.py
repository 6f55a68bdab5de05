"""Speed switches: channels-last memory format, torch.compile, activation checkpointing, GPU views.

Each switch is a config key (measured effects in docs/benchmarks.md):

* ``train.channels_last`` (``auto``: on for CUDA only) - the model's weights and the input
  batches in ``channels_last_3d`` (``channels_last`` in 2D). cuDNN's fastest 3D convolutions
  are channels-last under bf16/fp16; on CPU (oneDNN) it was measured slower, hence ``auto``.
* ``train.compile`` (opt-in) - ``torch.compile`` of the online and the target encoder's
  hook-free forward (:func:`compile_encoder`; ``nn.Module.compile``: in place, so state_dict
  keys and ``encoder.pt`` are unchanged): one graph for ``hidden_layer: avgpool`` (the
  network's output is the representation), else the residual stages without a hooked layer.
* cuDNN autotuning - ``torch.backends.cudnn.benchmark`` is switched on for CUDA devices
  (:func:`byol3d.training.builders.process_device`): the shapes of a run are fixed, so each
  convolution's fastest algorithm is picked once.
* ``train.activation_checkpointing`` (opt-in) - the online encoder's residual blocks keep no
  activations; they are recomputed in the backward pass (about 1/3 more compute for much less
  memory: large crops or batches of 8+ volumes on one GPU). Batch-norm running statistics are
  updated once per step, as without checkpointing.
* ``data.gpu_views`` (opt-in, CUDA only) - the random views are drawn on the GPU from the
  RAM-cached volumes, in :class:`monai.data.ThreadDataLoader` threads (GPU tensors do not
  cross process boundaries), see :func:`device_views`.

>>> import torch
>>> from byol3d import BYOL, build_encoder
>>> from byol3d.training.accel import apply_speed_options
>>> model = BYOL(build_encoder("resnet10"), input_shape=(1, 32, 32, 32), hidden_dim=64, projection_dim=16)
>>> apply_speed_options(model, channels_last=False, activation_checkpointing=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from monai.transforms import Compose, ToDeviced
from torch import nn
from torch.utils.checkpoint import checkpoint

from byol3d.transforms.batched_ops import make_views

#: Values of ``train.channels_last``.
CHANNELS_LAST_CHOICES = ("auto", "on", "off")


_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resolve_channels_last(setting: str, device: torch.device | str) -> bool:
    """``train.channels_last``: ``on``/``off`` as given, ``auto`` -> on for CUDA devices only."""
    if setting not in CHANNELS_LAST_CHOICES:
        raise ValueError(
            f"invalid channels_last {setting!r}, must be one of {', '.join(CHANNELS_LAST_CHOICES)}"
        )
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def memory_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last_3d`` for volumes, ``torch.channels_last`` for 2D images."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"invalid spatial_dims {spatial_dims!r}, must be 2 or 3")
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


class _KeepBatchNormStats:
    """During a checkpointed recompute: batch norm uses batch statistics but leaves its running ones."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[tuple] = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            if m.num_batches_tracked is not None:
                m.num_batches_tracked = m.num_batches_tracked.clone()

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum, m.num_batches_tracked = momentum, tracked


class CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose children run under ``torch.utils.checkpoint`` when training.

    Only while gradients are being recorded for its parameters (the online encoder in a
    training step); otherwise (target encoder, evaluation, ``no_grad``) it is a plain
    ``nn.Sequential``. Same submodules, so the same state_dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return super().forward(x)
        for block in self:
            x = checkpoint(
                block,
                x,
                use_reentrant=False,
                context_fn=lambda b=block: (contextlib.nullcontext(), _KeepBatchNormStats(b)),
            )
        return x


def enable_activation_checkpointing(net: nn.Module, layers: tuple[str, ...] = _LAYERS) -> int:
    """Turn the residual stages ``layers`` of a MONAI ResNet into :class:`CheckpointedSequential`.

    The class of each stage is swapped in place (weights, keys and hooks untouched). Returns
    the number of stages changed.
    """
    changed = 0
    for name in layers:
        stage = getattr(net, name, None)
        if isinstance(stage, nn.Sequential):
            stage.__class__ = CheckpointedSequential
            changed += 1
    if not changed:
        raise ValueError(
            f"activation checkpointing found none of the stages {', '.join(layers)} in the encoder"
        )
    return changed


def compile_encoder(encoder: nn.Module, **compile_kwargs) -> list[str]:
    """``torch.compile`` a :class:`byol3d.models.encoders.HookedEncoder`'s network, hook-free.

    When the network's output is the representation (``encoder.direct``: MONAI's ResNet with
    ``hidden_layer: avgpool``) and no dense map is read, the whole forward is compiled as one
    graph (``nn.Module.compile``, in place: state_dict keys and ``encoder.pt`` unchanged). A
    forward with hooks cannot be compiled whole (the hooks come and go at every call), and
    compiling each residual block hits Dynamo's recompile limit (8): the blocks share one code
    object. Then the residual stages that carry no hooked layer are compiled instead (at most
    four stage graphs per mode), and the hooked stage runs eagerly.

    Args:
        encoder: a ``HookedEncoder`` (``.net``, ``.layer``, ``.dense_layer``, ``.direct``).
        compile_kwargs: passed to ``torch.compile``; ``dynamic=False`` unless given (training
            shapes are fixed; inductor's symbolic 3D convolutions fail on CPU).

    Returns:
        The names of the compiled modules (``["net"]`` or stage names).
    """
    kwargs = {"dynamic": False, **compile_kwargs}
    hooked = [name for name in (encoder.layer, encoder.dense_layer) if name]
    if encoder.direct and encoder.dense_layer is None:
        encoder.net.compile(**kwargs)
        return ["net"]
    done = []
    for name in _LAYERS:
        stage = getattr(encoder.net, name, None)
        if stage is None or any(h == name or h.startswith(name + ".") for h in hooked):
            continue
        stage.compile(**kwargs)
        done.append(name)
    return done


def apply_speed_options(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    activation_checkpointing: bool = False,
    spatial_dims: int = 3,
) -> None:
    """Apply the speed switches to a :class:`byol3d.BYOL` in place (before DDP and the optimizer).

    Args:
        model: the BYOL module (its ``online_encoder`` and ``target_encoder`` are changed).
        channels_last: weights in ``channels_last_3d``/``channels_last`` memory format (the
            trainer must convert inputs too: ``create_trainer(memory_format=...)``).
        compile: :func:`compile_encoder` on the online and the target encoder (each
            separately: a compiled module must not be shared by a deep copy).
        activation_checkpointing: :func:`enable_activation_checkpointing` on both encoders
            (the target runs without gradients, so it is never recomputed).
        spatial_dims: 2 or 3, for the memory format.
    """
    encoders = [model.online_encoder, model.target_encoder]
    if activation_checkpointing:
        for enc in encoders:
            enable_activation_checkpointing(enc.net)
    if channels_last:
        model.to(memory_format=memory_format(spatial_dims))
    if compile:
        for enc in encoders:
            compile_encoder(enc)


class DeviceViewLoader:
    """Batches of boxes in, batches of views made on ``device`` out, one batch ahead.

    ``transforms.views: batched`` on a GPU: the wrapped loader yields batches of
    :func:`byol3d.transforms.batched.collate_boxes` (patches pinned by the DataLoader), and
    :func:`byol3d.transforms.batched_ops.make_views` makes their views on the device. On CUDA
    batch ``i + 1``'s copies and views are queued on a side stream before batch ``i`` is
    handed to the training step, so they overlap with it; the compute stream waits for a
    batch's views only when it gets them (``wait_stream``), and its tensors are recorded on
    the compute stream so the caching allocator does not reuse them early. Elsewhere the
    views are made in order, in this process.

    ``len()``, ``sampler``, ``dataset`` and ``batch_size`` are the wrapped loader's, so Ignite
    and the samplers' ``set_epoch`` see it as the loader.
    """

    def __init__(
        self,
        loader,
        roi_size,
        device: torch.device | str,
        view_keys=("view1", "view2"),
        memory_format: torch.memory_format | None = None,
    ) -> None:
        self.loader, self.roi_size, self.device = loader, tuple(roi_size), torch.device(device)
        self.view_keys, self.memory_format = tuple(view_keys), memory_format

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ("sampler", "dataset", "batch_size"):
            return getattr(self.loader, name)
        raise AttributeError(name)

    def _make(self, batch):
        return make_views(
            batch, self.roi_size, self.device, self.view_keys, memory_format=self.memory_format
        )

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._make(batch)
            return
        side, compute = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(side):
                made = self._make(batch)
            if pending is not None:
                yield pending  # its step is queued while `made` is computed on the side
            compute.wait_stream(side)
            for key in self.view_keys:
                made[key].record_stream(compute)
            pending = made
        if pending is not None:
            yield pending


def device_views(
    views: Callable, device: torch.device | str, source_key: str = "image"
) -> Callable:
    """The view transform preceded by a copy of the source image to ``device``.

    Used with ``data.gpu_views``: the cached volume goes to the GPU once per sample and the crop,
    flips, intensity changes, blur and noise run there. Feed the dataset to a
    ``monai.data.ThreadDataLoader`` (threads, not processes) with ``pin_memory=False``.
    ``set_random_state`` is forwarded to ``views`` (so :class:`byol3d.training.handlers.Reseed` still works).
    """

    return Compose([ToDeviced(source_key, device=torch.device(device)), views])
