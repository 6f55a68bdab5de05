"""lightly's BYOL example loop (``examples/pytorch/byol.py``) for scripts/bench_quality.py.

The loop, the model and the transform as the example writes them, on byol3d's encoder and
the benchmark's shared settings (:class:`bench_quality.QualitySetup`): ``BYOLTransform`` of
``BYOLView1Transform``/``BYOLView2Transform`` at the input size, ``BYOLProjectionHead``,
``BYOLPredictionHead``, ``deactivate_requires_grad``, ``update_momentum`` with
``cosine_schedule(epoch, epochs, base_tau, 1)``, per-view online and momentum forwards,
``NegativeCosineSimilarity``. Needs lightly and torchvision (``make bench-env``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from byol3d import build_encoder

if TYPE_CHECKING:
    from bench_quality import QualitySetup


class _PILFiles(torch.utils.data.Dataset):
    """The files as PIL RGB images through ``transform`` (a torchvision image folder's items)."""

    def __init__(self, files: Sequence[str], transform: Callable) -> None:
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), 0


def lightly_model(s: QualitySetup, seed: int) -> nn.Module:
    """lightly's example ``BYOL`` module on byol3d's encoder (built after ``manual_seed(seed)``)."""
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad

    class BYOL(nn.Module):
        def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(feature_dim, s.hidden_dim, s.projection_dim)
            self.prediction_head = BYOLPredictionHead(
                s.projection_dim, s.hidden_dim, s.projection_dim
            )
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            y = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(y)
            return self.prediction_head(z)

        def forward_momentum(self, x):
            y = self.backbone_momentum(x).flatten(start_dim=1)
            z = self.projection_head_momentum(y)
            return z.detach()

    torch.manual_seed(seed)
    backbone = build_encoder(s.encoder, spatial_dims=2, in_channels=3)
    with torch.no_grad():
        feature_dim = backbone.eval()(torch.zeros(1, 3, s.size, s.size)).flatten(1).shape[1]
    return BYOL(backbone.train(), feature_dim)


def train_lightly(
    s: QualitySetup, files: Sequence[str], seed: int, mean, std, epochs: int
) -> tuple[nn.Module, dict]:
    """lightly's BYOL example loop on ``files`` (see the module docstring)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )
    from lightly.utils.scheduler import cosine_schedule

    device = torch.device(s.device)
    model = lightly_model(s, seed).to(device)
    normalize = {"mean": list(mean), "std": list(std)}
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=s.size, normalize=normalize),
        view_2_transform=BYOLView2Transform(input_size=s.size, normalize=normalize),
    )
    dataloader = torch.utils.data.DataLoader(
        _PILFiles(files, transform),
        batch_size=s.batch,
        shuffle=True,
        drop_last=True,
        num_workers=s.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps, last = 0, []
    for epoch in range(epochs):
        total_loss = 0
        momentum_val = cosine_schedule(epoch, epochs, s.base_tau, 1)
        for batch in dataloader:
            x0, x1 = batch[0]
            update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum_val)
            x0 = x0.to(device)
            x1 = x1.to(device)
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        last.append(float(total_loss / len(dataloader)))
    return model.backbone.eval(), {"steps": steps, "final_loss": last[-1] if last else None}
