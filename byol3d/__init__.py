"""byol3d: BYOL self-supervised pretraining of the encoder you fine-tune (MONAI ResNet, SwinUNETR, SegResNet, nnU-Net) on CT volumes and 2D frames.

>>> import byol3d
>>> enc = byol3d.build_encoder("resnet10", spatial_dims=3, in_channels=1)
>>> model = byol3d.BYOL(enc, input_shape=(1, 32, 32, 32), hidden_dim=64, projection_dim=16)
"""

from __future__ import annotations

from byol3d.config import load_config
from byol3d.errors import Byol3dError, CheckpointError, ConfigError, DataError
from byol3d.evaluation.export import load_into, load_into_flexible_unet
from byol3d.evaluation.features import extract_features, load_encoder
from byol3d.models.byol import BYOL, byol_loss, collapse_std, cosine_tau
from byol3d.models.encoders import HookedEncoder, build_encoder
from byol3d.models.heads import MLP
from byol3d.training.pretrain import pretrain

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
    "load_into",
    "load_into_flexible_unet",
    "pretrain",
]
