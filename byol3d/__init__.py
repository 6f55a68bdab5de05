"""byol3d: BYOL self-supervised pretraining for MONAI ResNet encoders on CT volumes and 2D frames.

>>> import byol3d
>>> enc = byol3d.build_encoder("resnet10", spatial_dims=3, in_channels=1)
>>> model = byol3d.BYOL(enc, input_shape=(1, 32, 32, 32), hidden_dim=64, projection_dim=16)
"""

from __future__ import annotations

from byol3d.byol import BYOL, byol_loss, collapse_std, cosine_tau
from byol3d.config import load_config
from byol3d.errors import Byol3dError, CheckpointError, ConfigError, DataError
from byol3d.networks import MLP, HookedEncoder, build_encoder

__version__ = "0.1.0"

__all__ = [
    "BYOL",
    "MLP",
    "Byol3dError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HookedEncoder",
    "build_encoder",
    "byol_loss",
    "collapse_std",
    "cosine_tau",
    "extract_features",
    "load_config",
    "load_encoder",
    "load_into_flexible_unet",
    "pretrain",
]


def __getattr__(name: str):
    # `pretrain` pulls in the data pipeline; import it only when asked for
    if name == "pretrain":
        from byol3d.train import pretrain

        return pretrain
    # evaluation and export pull in MONAI's inferers and FlexibleUNet: imported when asked for
    if name in ("load_encoder", "extract_features"):
        from byol3d import features

        return getattr(features, name)
    if name == "load_into_flexible_unet":
        from byol3d.export import load_into_flexible_unet

        return load_into_flexible_unet
    raise AttributeError(f"module 'byol3d' has no attribute {name!r}")
