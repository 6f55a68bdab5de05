"""Embeddings and feature maps of a pretrained encoder, preprocessed exactly as in pretraining.

    byol3d extract runs/ct --data /data/ct_test --output feats/
    byol3d extract runs/ct --csv labels.csv --output feats/ --layers layer1,layer2,layer3,layer4

writes ``feats/features.npy`` (N x D float32, one row per volume or frame, D = 512 for
resnet10/18/34 and 2048 for resnet50+), ``feats/index.csv`` (row, path, and id/label when
read from a CSV) and, with ``--layers``, ``feats/maps/<row>.npz`` with one feature map per
layer. In Python:

    >>> import byol3d
    >>> enc = byol3d.load_encoder("runs/ct")                    # doctest: +SKIP
    >>> enc.roi_size, enc.hu_window, enc.pixdim                  # doctest: +SKIP
    ((128, 128, 128), (-1000.0, 1000.0), (1.5, 1.5, 2.0))
    >>> x = enc.preprocess({"image": "ct.nii.gz"})["image"]     # doctest: +SKIP
    >>> byol3d.extract_features(enc, [x]).shape                  # doctest: +SKIP
    (1, 2048)

Every image goes through the run's deterministic preprocessing
(:func:`byol3d.transforms.build_eval_transform`: orientation, spacing, the intensity rule (HU
window, percentiles or z-score), foreground crop, padding to the crop size; for 2D frames also the views' normalisation). The network then sees it in windows of the pretraining crop size
(``monai.inferers.sliding_window_inference``, so a 512 x 512 x 300 scan costs no more memory
than one crop); the embedding is the global average of the stitched ``layer4`` map, i.e. the
encoder's own ``avgpool`` output when the image is one crop.
"""

from __future__ import annotations

import copy
import csv as csv_module
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from byol3d.config import default_config
from byol3d.data.discovery import list_images, read_image_list
from byol3d.data.readers import as_tensor
from byol3d.errors import CheckpointError, DataError
from byol3d.evaluation.weights import check_state, read_encoder_state
from byol3d.models.encoders import arch_options, build_encoder, layer_outputs
from byol3d.models.stages import deepest_stage, resolve_layer
from byol3d.transforms import PREPROCESS_KEYS, build_eval_transform

LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class LoadedEncoder:
    """A pretrained encoder (eval mode) with the preprocessing settings of its run.

    Attributes:
        encoder: the MONAI ResNet (``forward`` returns the ``avgpool`` embedding).
        name, spatial_dims, in_channels, norm: its architecture (``model.encoder``, ...).
        roi_size, hu_window, pixdim, crop_foreground, foreground_hu, intensity, percentiles,
            foreground: the run's preprocessing (``transforms.*``, as in
            :data:`byol3d.transforms.PREPROCESS_KEYS`); ``pixdim`` None means the files' own
            spacing was kept; ``intensity`` is the normalisation rule (``ct_window``,
            ``percentile`` or ``zscore``, a run from before the rule existed: ``ct_window``).
        config: the run's whole nested config; ``source``: the weight file read.
    """

    encoder: nn.Module
    name: str
    spatial_dims: int
    in_channels: int
    norm: str
    roi_size: tuple[int, ...]
    hu_window: tuple[float, float]
    pixdim: tuple[float, ...] | None
    crop_foreground: bool
    foreground_hu: float
    config: dict[str, Any] = field(repr=False)
    source: Path | None = None
    intensity: str = "ct_window"
    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground: str = "auto"

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The run's :data:`~byol3d.transforms.PREPROCESS_KEYS` and channel count: two encoders
        whose dicts are equal see identically prepared input."""
        tf = self.config["transforms"]
        return {"in_channels": self.in_channels, **{k: tf[k] for k in PREPROCESS_KEYS}}

    @property
    def preprocess(self):
        """What the encoder saw in training, without augmentation (:func:`build_eval_transform`).

        ``{"image": path} -> {"image": (C, *spatial)}``: the run's deterministic preprocessing
        and, for 2D frames, the views' [0, 1] scaling and ``transforms.mean/std`` normalisation.
        """
        return build_eval_transform(self.config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _merge_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults updated with a run's config (keys of newer or older versions tolerated)."""
    merged = default_config()
    for key, value in config.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(copy.deepcopy(dict(value)))
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_encoder(source: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """Load a pretrained encoder and its preprocessing settings from a run.

    Args:
        source: a run directory, its ``encoder.pt`` (a bare state_dict; the settings come from
            the ``config.yaml`` beside it) or a training checkpoint (which carries its config).
            Files are read with ``torch.load(..., weights_only=True)``.
        device: where to put the encoder (default CPU).

    Returns:
        A :class:`LoadedEncoder` in eval mode with every key loaded strictly.

    Raises:
        CheckpointError: no weights, no config, or weights that do not fit the config's
            architecture (one line naming both).
    """
    state, config, path = read_encoder_state(source)
    if not config:
        raise CheckpointError(
            f"no config for {str(path)!r}: keep the run's config.yaml next to encoder.pt "
            "(it holds the preprocessing the encoder was trained with)"
        )
    cfg = _merge_config(config)
    data, model, tf = cfg["data"], cfg["model"], cfg["transforms"]
    try:
        encoder = build_encoder(
            model["encoder"],
            data["spatial_dims"],
            data["in_channels"],
            model["norm"],
            **arch_options(model),
        )
    except ValueError as err:
        raise CheckpointError(f"the config of {str(path)!r} is not usable: {err}") from err
    check_state(state, encoder.state_dict(), path, f"the run's model.encoder {model['encoder']!r}")
    encoder.load_state_dict(state, strict=True)
    encoder.to(device).eval()
    return LoadedEncoder(
        encoder=encoder,
        name=model["encoder"],
        spatial_dims=data["spatial_dims"],
        in_channels=data["in_channels"],
        norm=model["norm"],
        roi_size=tuple(int(r) for r in tf["roi_size"]),
        hu_window=tuple(float(h) for h in tf["hu_window"]),
        pixdim=None if tf["pixdim"] is None else tuple(float(p) for p in tf["pixdim"]),
        crop_foreground=bool(tf["crop_foreground"]),
        foreground_hu=float(tf["foreground_hu"]),
        config=cfg,
        source=path,
        intensity=str(tf["intensity"]),
        percentiles=tuple(float(p) for p in tf["percentiles"]),
        foreground=str(tf["foreground"]),
    )


def random_encoder(enc: LoadedEncoder, index: int = 0) -> nn.Module:
    """A randomly initialised encoder of ``enc``'s architecture, in eval mode (the baseline).

    Built after ``torch.manual_seed(run_seed + index)``, exactly as pretraining builds its
    encoder, so ``random_encoder(enc, 0)`` *is* the initialisation the run started from; the
    global RNG is restored afterwards.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(enc.config.get("seed", 0)) + int(index))
        net = build_encoder(
            enc.name,
            enc.spatial_dims,
            enc.in_channels,
            enc.norm,
            **arch_options(enc.config["model"]),
        )
    finally:
        torch.random.set_rng_state(state)
    param = next(enc.encoder.parameters(), None)
    return net.to(param.device if param is not None else "cpu").eval()


def _unpack(encoder: LoadedEncoder | nn.Module, roi_size) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(encoder, LoadedEncoder):
        return encoder.encoder, tuple(roi_size or encoder.roi_size)
    if roi_size is None:
        raise ValueError("roi_size is required when encoder is a plain nn.Module")
    return encoder, tuple(int(r) for r in roi_size)


class _LayerMaps(nn.Module):
    """The encoder's outputs of ``layers`` as a tuple (forward hooks live for one call),
    optionally under autocast and in a memory format; float32 out."""

    def __init__(self, net: nn.Module, layers: Sequence[str], amp_dtype=None, memory_format=None):
        super().__init__()
        self.net, self.layers = net, tuple(layers)
        self.amp_dtype, self.memory_format = amp_dtype, memory_format

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        if self.amp_dtype is None:
            return tuple(layer_outputs(self.net, x, self.layers))
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            return tuple(m.float() for m in layer_outputs(self.net, x, self.layers))


@torch.no_grad()
def feature_maps(
    encoder: LoadedEncoder | nn.Module,
    image: torch.Tensor,
    layers: Sequence[str] = LAYERS,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> dict[str, torch.Tensor]:
    """Feature maps of one image at several layers, stitched by sliding-window inference.

    Args:
        encoder: a :class:`LoadedEncoder` or a MONAI ResNet (then ``roi_size`` is required).
        image: ``(C, *spatial)`` or ``(1, C, *spatial)``, already preprocessed.
        layers: names from ``layer1..layer4`` (strides 4, 8, 16, 32).
        roi_size: window size; default the run's crop size. Smaller images are padded.
        overlap: window overlap (MONAI's ``overlap``); 0.25 by default.
        sw_batch_size: windows per forward pass.
        device: where to compute (default: the encoder's device).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); None: full precision.
        memory_format: e.g. ``torch.channels_last_3d`` for a channels-last encoder.

    Returns:
        ``{layer: (channels, *spatial // stride)}`` float32 CPU tensors (strides 4, 8, 16, 32).
    """

    net, roi = _unpack(encoder, roi_size)
    modules = dict(net.named_modules())
    resolved = [resolve_layer(net, name) for name in layers]
    bad = [name for name, module in zip(layers, resolved, strict=True) if module not in modules]
    if not layers or bad:
        raise ValueError(f"invalid layers {list(layers)!r}, must be some of {', '.join(LAYERS)}")
    param = next(net.parameters())
    device = torch.device(device) if device is not None else param.device
    x = image if image.ndim == len(roi) + 2 else image.unsqueeze(0)
    if x.ndim != len(roi) + 2:
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match roi_size {roi} "
            f"(expected (C, *spatial) with {len(roi)} spatial dims)"
        )
    was_training = net.training
    net.eval()
    try:
        maps = sliding_window_inference(
            torch.as_tensor(x, dtype=torch.float32),
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            predictor=_LayerMaps(net, resolved, amp_dtype, memory_format),
            overlap=overlap,
            mode="constant",
            sw_device=device,
            device="cpu",
        )
    finally:
        net.train(was_training)
    if isinstance(maps, torch.Tensor):  # MONAI unpacks a predictor's 1-tuple
        maps = (maps,)
    return {name: as_tensor(m[0]).float() for name, m in zip(layers, maps, strict=True)}


def extract_features(
    encoder: LoadedEncoder | nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
    layers: Sequence[str] | None = None,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> np.ndarray:
    """Global embeddings of preprocessed images: an ``N x D`` float32 array.

    Each image is seen in windows of ``roi_size`` (the pretraining crop) and the row is the
    global average of each layer's stitched map; with the default ``layers=("layer4",)`` this
    equals ``encoder(image)`` (its ``avgpool`` output) for an image of exactly ``roi_size``.
    Several layers give their pooled features concatenated (e.g. 64+128+256+512 = 960 columns
    for layer1..layer4 of resnet10), a multi-scale embedding.

    Args:
        encoder: a :class:`LoadedEncoder` or a MONAI ResNet (then ``roi_size`` is required).
        images: a ``(N, C, *spatial)`` tensor, or an iterable of ``(C, *spatial)`` tensors of
            any sizes (e.g. a tqdm-wrapped generator over files).
        roi_size, overlap, sw_batch_size, device, amp_dtype, memory_format: as in
            :func:`feature_maps`.
        layers: layers whose global averages make up the row; None: the deepest stage
            (``layer4`` of a ResNet, :func:`byol3d.models.stages.deepest_stage`).

    Returns:
        ``np.ndarray`` of shape ``(N, D)``, float32.
    """
    if layers is None:
        layers = (deepest_stage(_unpack(encoder, roi_size)[0]),)
    rows = []
    for image in images:
        maps = feature_maps(encoder, image, layers, roi_size, overlap, sw_batch_size, device,
                            amp_dtype=amp_dtype, memory_format=memory_format)  # fmt: skip
        rows.append(torch.cat([m.flatten(1).mean(1) for m in maps.values()]))
    if not rows:
        raise ValueError("no images to extract features from")
    return torch.stack(rows).numpy().astype(np.float32)


def extract_to_folder(
    source: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    csv: str | Path | None = None,
    root: str | Path | None = None,
    layers: Sequence[str] | None = None,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, Path]:
    """``byol3d extract``: embeddings of every image of a folder or CSV list, written to ``output``.

    Args:
        source: run directory, ``encoder.pt`` or checkpoint (see :func:`load_encoder`).
        output: folder for ``features.npy`` (N x D float32), ``index.csv`` (``row,path`` plus
            ``id,label`` from a CSV) and, with ``layers``, ``maps/<row>.npz`` (one array per
            layer, ``(channels, *spatial / stride)``).
        data: folder searched recursively like ``data.root`` (NIfTI, NRRD, MHA, DICOM series;
            for a multi-sequence run, its subject folders by the run's ``data.channels``).
        csv: instead of ``data``: a CSV with a ``path`` (or ``id``) column, see
            :func:`byol3d.data.discovery.read_image_list`; ``root`` resolves its relative paths.
        layers: also write the stitched feature maps of these layers (``layer1..layer4``).
        overlap: sliding-window overlap.
        device: where to run the encoder.
        progress: show a tqdm progress bar.

    Returns:
        The paths of ``features.npy`` and ``index.csv``.
    """

    if (data is None) == (csv is None):
        raise DataError("give exactly one of a data folder (--data) or a CSV list (--csv)")
    if layers:
        bad = [name for name in layers if name not in LAYERS]
        if bad:
            raise DataError(f"invalid layer {bad[0]!r}, must be some of {', '.join(LAYERS)}")
    enc = load_encoder(source, device=device)
    data_cfg = enc.config["data"]
    if csv is not None:
        rows = read_image_list(csv, root=root, channels=data_cfg["channels"])
    else:
        found = list_images(data, dicom=bool(data_cfg["dicom"]), channels=data_cfg["channels"],
                            channel_patterns=data_cfg["channel_patterns"])  # fmt: skip
        rows = [{"image": p} for p in found]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if layers:
        (out / "maps").mkdir(exist_ok=True)
    preprocess = enc.preprocess
    deepest = deepest_stage(enc.encoder)
    features = []
    for i, row in enumerate(tqdm(rows, desc="extract", unit="image", disable=not progress)):
        image = preprocess({"image": row["image"]})["image"]
        wanted = tuple(dict.fromkeys([deepest, *(layers or [])]))
        maps = feature_maps(enc, image, wanted, overlap=overlap, device=device)
        features.append(maps[deepest].flatten(1).mean(1))
        if layers:
            np.savez(out / "maps" / f"{i:06d}.npz", **{k: maps[k].numpy() for k in layers})
    feats = torch.stack(features).numpy().astype(np.float32)
    np.save(out / "features.npy", feats)
    columns = ["row", "path"] + [c for c in ("id", "label") if any(c in r for r in rows)]
    with open(out / "index.csv", "w", newline="") as fh:
        writer = csv_module.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for i, row in enumerate(rows):
            path = row["image"]  # a subject's channel files: joined with ";"
            path = ";".join(path) if isinstance(path, list) else path
            writer.writerow([i, path, *(row.get(c, "") for c in columns[2:])])
    return out / "features.npy", out / "index.csv"
