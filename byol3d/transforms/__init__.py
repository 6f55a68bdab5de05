"""Transforms: deterministic preprocessing, then BYOL's two views (2D frames or 3D volumes).

:func:`build_transforms` is the one place that reads the ``transforms.*`` config and picks the
path on ``data.spatial_dims``:

- 3D (:mod:`byol3d.transforms.ct`): load, reorient, resample, window, crop the air; two views
  by random resized crop (:mod:`~byol3d.transforms.crops`), flips and turns
  (:mod:`~byol3d.transforms.geometry`), intensity jitter, gamma, blur and noise;
- 2D (:mod:`byol3d.transforms.frames`): load an RGB frame as uint8; two views by BYOL's RGB
  recipe (colour ops in :mod:`~byol3d.transforms.photometric`).

With ``transforms.views: batched`` both paths only draw the views' boxes and parameters per
sample (:mod:`~byol3d.transforms.batched`) and make the views per batch
(:mod:`~byol3d.transforms.batched_ops`).

Reading files is :mod:`byol3d.data.readers`' job; the pipelines here start with its loaders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.transforms import Compose

from byol3d.data.discovery import list_images
from byol3d.data.stats import compute_mean_std
from byol3d.data.store_writer import StoreReport, write_store
from byol3d.errors import ConfigError
from byol3d.transforms.batched import BoxViewsd, FrameBoxViewsd
from byol3d.transforms.ct import PreprocessCompose, ct_preprocess
from byol3d.transforms.frames import (
    FRAME_ONLY_KEYS,
    LoadFrameLabelMapd,
    build_frame_transforms,
    frame_network_input,
)
from byol3d.transforms.volume_views import view_transforms

__all__ = [
    "PREPROCESS_KEYS",
    "build_eval_transform",
    "build_transforms",
    "config_mean_std",
    "preprocess_store",
    "store_folder",
]

#: The ``transforms.*`` keys of the deterministic 3D preprocessing: what a run's encoder needs
#: its input prepared with (reported by export, compared by evaluation and fine-tuning).
PREPROCESS_KEYS = (
    "roi_size", "hu_window", "pixdim", "crop_foreground", "foreground_hu",
    "intensity", "percentiles", "foreground",
)  # fmt: skip
_PREPROCESS_KEYS = PREPROCESS_KEYS
#: ``transforms.*`` keys that choose where views are made, not what they are.
VIEW_PLACEMENT_KEYS = ("views", "device")


def build_transforms(cfg: Mapping[str, Any]):
    """The config's deterministic preprocessing and (freshly constructed) two-view transforms.

    The :data:`PREPROCESS_KEYS` (``transforms.roi_size/hu_window/pixdim/crop_foreground/
    foreground_hu/intensity/percentiles/foreground``) and ``data.in_channels`` go to
    :func:`byol3d.transforms.ct_preprocess`; ``roi_size`` and the
    other ``transforms.*`` keys to :func:`byol3d.transforms.view_transforms`, or with
    ``transforms.views: batched`` to :class:`byol3d.transforms.batched.BoxViewsd` (same keys,
    same distributions; the views are then made per batch, see
    :mod:`byol3d.transforms.batched_ops`). 2D frames (``data.spatial_dims: 2``) go to
    :func:`byol3d.transforms.frames.build_frame_transforms`: :func:`~byol3d.transforms.frames.frame_views`,
    or with ``transforms.views: batched`` :class:`~byol3d.transforms.batched.FrameBoxViewsd`.

    Raises:
        ConfigError: settings the transforms reject (e.g. a threshold outside the HU window).
    """
    tf_cfg = cfg["transforms"]
    batched = tf_cfg.get("views", "cpu") == "batched"
    if cfg["data"]["spatial_dims"] == 2:  # frames: byol3d.transforms.frames, same structure
        try:
            return build_frame_transforms(cfg, FrameBoxViewsd if batched else None)
        except ValueError as err:
            raise ConfigError(f"transforms: {err}") from err
    try:
        preprocess = ct_preprocess(
            **_data_arguments(cfg), **{k: tf_cfg[k] for k in _PREPROCESS_KEYS}
        )
        make = BoxViewsd if batched else view_transforms
        views = make(
            roi_size=list(tf_cfg["roi_size"]),
            **{
                k: v
                for k, v in tf_cfg.items()
                if k not in (*_PREPROCESS_KEYS, *FRAME_ONLY_KEYS, *VIEW_PLACEMENT_KEYS)
            },
        )
    except ValueError as err:
        raise ConfigError(f"transforms: {err}") from err
    return preprocess, views


def _data_arguments(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data.*`` keys :func:`ct_preprocess` takes: channels, resampling, DICOM series."""
    data = cfg["data"]
    return {
        "in_channels": data["in_channels"],
        "channel_names": data.get("channels"),
        "resample_channels": bool(data.get("resample_channels", False)),
        "dicom_series": data.get("dicom_series"),
    }


def build_eval_transform(cfg: Mapping[str, Any], label_key: str | None = None) -> Compose:
    """What a frozen encoder of this config must see: the training input without augmentation.

    ``{"image": path} -> {"image": (C, *spatial) float32}``: the deterministic preprocessing
    of :func:`build_transforms`, then the deterministic steps every training view ends with
    (2D: uint8 -> [0, 1] and the ``transforms.mean/std`` normalisation; 3D: none, the
    intensity rule of ``transforms.intensity`` is part of the preprocessing). Evaluation, extraction, export reports and the kNN
    monitor all use it, so they preprocess exactly as training did.

    Args:
        cfg: a run's (validated) config.
        label_key: also load a label map under this key with the image's geometry
            (nearest-neighbour resampling, the image's crop; for 2D frames
            :class:`~byol3d.transforms.frames.LoadFrameLabelMapd`), for dense probes.

    Raises:
        ConfigError: settings the transforms reject.
    """
    preprocess, _ = build_transforms(cfg)
    if cfg["data"]["spatial_dims"] == 2:
        tf_cfg = cfg["transforms"]
        try:
            network_input = frame_network_input("image", tf_cfg.get("mean"), tf_cfg.get("std"))
        except ValueError as err:
            raise ConfigError(f"transforms: {err}") from err
        steps = [preprocess, network_input]
        if label_key is not None:
            steps.insert(1, LoadFrameLabelMapd(label_key, "image", tf_cfg.get("frame_size")))
        return PreprocessCompose(steps, config=preprocess.config)
    if label_key is None:
        return preprocess
    tf_cfg = cfg["transforms"]
    try:
        return ct_preprocess(
            label_key=label_key, **_data_arguments(cfg), **{k: tf_cfg[k] for k in _PREPROCESS_KEYS}
        )
    except ValueError as err:
        raise ConfigError(f"transforms: {err}") from err


def config_mean_std(
    cfg: Mapping[str, Any], max_files: int | None = 1000
) -> tuple[list[float], list[float], int]:
    """:func:`compute_mean_std` of the images a config trains on, after its preprocessing.

    What ``byol3d stats CONFIG`` prints. The files are those of ``byol3d pretrain``
    (``data.csv`` or ``data.root``), preprocessed by the config's deterministic transform.

    Returns:
        ``(mean, std, number of files read)``.

    Raises:
        ConfigError, DataError: as ``byol3d pretrain`` for the same config.
    """
    data_cfg = cfg["data"]
    files = config_files(cfg)
    preprocess, _ = build_transforms(cfg)
    n = len(files) if max_files is None else min(len(files), max_files)
    mean, std = compute_mean_std(
        files, preprocess, max_files=max_files, num_workers=data_cfg["num_workers"]
    )
    return mean, std, n


def config_files(cfg: Mapping[str, Any]) -> list:
    """The files (or channel lists) a config trains on: ``data.csv`` or ``data.root``, both splits."""
    data_cfg = cfg["data"]
    if not data_cfg.get("root") and not data_cfg.get("csv"):
        raise ConfigError("data.root is not set: give the data folder or data.csv")
    return list_images(
        data_cfg["root"],
        csv=data_cfg.get("csv"),
        spatial_dims=data_cfg["spatial_dims"],
        dicom=data_cfg.get("dicom", True),
        channels=data_cfg.get("channels"),
        channel_patterns=data_cfg.get("channel_patterns"),
    )


def store_folder(cfg: Mapping[str, Any]) -> Path:
    """The config's preprocess-once store: ``data.cache_dir``, else ``OUTPUT_DIR/store``."""
    return Path(cfg["data"]["cache_dir"] or Path(cfg["output_dir"]) / "store").expanduser()


def preprocess_store(
    cfg: Mapping[str, Any],
    workers: int | None = None,
    hash_sources: bool = False,
    progress: bool = True,
) -> StoreReport:
    """What ``byol3d preprocess CONFIG`` does: the config's files, preprocessed once, stored.

    The files are those ``byol3d pretrain`` trains on (``data.csv`` or ``data.root``, both
    splits), the preprocessing is the config's deterministic transform
    (:func:`build_transforms`), the folder :func:`store_folder`; bad files follow
    ``data.on_bad_file``. See :func:`byol3d.data.store_writer.write_store`.

    Args:
        cfg: a validated config.
        workers: preprocessing processes (default ``data.num_workers``).
        hash_sources: also record and check the sources' SHA-256.
        progress: a progress bar.

    Raises:
        ConfigError, DataError: as ``byol3d pretrain`` for the same config.
    """
    data_cfg = cfg["data"]
    files = config_files(cfg)
    preprocess, _ = build_transforms(cfg)
    return write_store(
        files,
        preprocess,
        store_folder(cfg),
        workers=data_cfg["num_workers"] if workers is None else workers,
        on_bad_file=data_cfg["on_bad_file"],
        hash_sources=hash_sources,
        progress=progress,
    )
