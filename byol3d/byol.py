"""The BYOL module: online and target networks, the symmetric loss, the EMA target update.

Grill et al., "Bootstrap Your Own Latent", 2020 (arXiv 2006.07733):

* online network: encoder f, projector g, predictor q; target network: encoder and
  projector only, an exponential moving average of the online ones,
  ``xi <- tau * xi + (1 - tau) * theta`` (the target encoder is a copy, never shared);
* loss ``2 - 2 * cos(q(z1), sg(z'2))``, symmetrised by swapping the views;
* ``tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2`` per optimizer step k of K.

>>> import torch
>>> from byol3d import BYOL, build_encoder
>>> model = BYOL(build_encoder("resnet10"), input_shape=(1, 32, 32, 32), hidden_dim=64, projection_dim=16)
>>> loss = model(torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32))
>>> loss.backward(); model.update_target(0.99)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from byol3d.networks import MLP, HookedEncoder

__all__ = ["BYOL", "byol_loss", "collapse_std", "cosine_tau"]


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 - 2 * cos(p, z)`` averaged over the batch, with no gradient into ``z``.

    Equal to the mean squared distance of the l2-normalised vectors (paper, eq. 2). Computed
    in float32 whatever the autocast dtype of the inputs.

    Args:
        p: online predictions, ``(B, D)``.
        z: target projections, ``(B, D)``; detached here (the stop-gradient).

    >>> byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    tensor(2.)
    """
    if p.shape != z.shape:
        raise ValueError(
            f"byol_loss needs p and z of the same shape, got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()


def cosine_tau(step: int, total_steps: int, base_tau: float = 0.996) -> float:
    """BYOL's target decay rate: ``base_tau`` at step 0, rising along a cosine to 1.0 at the end.

    ``tau = 1 - (1 - base_tau) * (cos(pi * k / K) + 1) / 2``, with k clipped to [0, K].

    >>> cosine_tau(0, 100), cosine_tau(100, 100)
    (0.996, 1.0)
    """
    if total_steps < 1:
        raise ValueError(f"invalid total_steps {total_steps!r}, must be >= 1")
    if not 0.0 <= base_tau <= 1.0:
        raise ValueError(f"invalid base_tau {base_tau!r}, must be in [0, 1]")
    k = min(max(int(step), 0), total_steps)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse statistic: per-dimension std of l2-normalised projections, averaged, x sqrt(D).

    About 1 for well-spread embeddings, towards 0 when the representation collapses to a
    point (the warning sign byol-pytorch#44/#85 users lacked). Returns a 0-dim tensor without
    a host sync; needs at least 2 rows.
    """
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


class BYOL(nn.Module):
    """Online encoder + projector + predictor, and an EMA target encoder + projector.

    Args:
        encoder: the backbone, e.g. ``byol3d.build_encoder("resnet50")``. It is used by the
            online network as is (``model.encoder`` returns it) and deep-copied for the target.
        input_shape: ``(channels, *spatial)`` of one view, e.g. ``(1, 128, 128, 128)``; used for
            a dry run that finds the representation size.
        hidden_layer: the encoder layer whose output is the representation (``"avgpool"``;
            a spatial layer such as ``"layer4"`` is global-average-pooled).
        projection_dim: output size of projector and predictor (paper: 256).
        hidden_dim: hidden size of projector and predictor (paper: 4096).

    Submodules: ``online_encoder``, ``online_projector``, ``predictor`` (trained) and
    ``target_encoder``, ``target_projector`` (``requires_grad=False``, updated only by
    :meth:`update_target`). The target runs in the same train/eval mode as the whole module,
    so in training its batch norm uses batch statistics, as in the paper's implementation.
    """

    def __init__(
        self,
        encoder: nn.Module,
        input_shape: Sequence[int],
        hidden_layer: str = "avgpool",
        projection_dim: int = 256,
        hidden_dim: int = 4096,
    ) -> None:
        super().__init__()
        self.online_encoder = HookedEncoder(encoder, hidden_layer)
        feature_dim = self.online_encoder.feature_dim(input_shape)
        self.online_projector = MLP(feature_dim, hidden_dim, projection_dim)
        self.predictor = MLP(projection_dim, hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self._target_params():
            p.requires_grad_(False)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.feature_dim = feature_dim

    @property
    def encoder(self) -> nn.Module:
        """The online encoder network (what gets exported as ``encoder.pt``)."""
        return self.online_encoder.net

    def _online_params(self) -> list[torch.Tensor]:
        return [*self.online_encoder.parameters(), *self.online_projector.parameters()]

    def _target_params(self) -> list[torch.Tensor]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetric BYOL loss of two batches of views of the same images.

        Both views go through each network in one concatenated forward pass (one kernel launch
        per layer instead of two; batch norm sees both views, as in the paper's implementation).

        Args:
            view1, view2: ``(B, C, *spatial)`` tensors of equal shape, row i of each being two
                augmentations of sample i.
            return_stats: also return ``{"collapse": collapse_std(online projections)}``.

        Returns:
            ``byol_loss(q(z1), z'2) + byol_loss(q(z2), z'1)``, a scalar in [0, 8].
        """
        if view1.shape != view2.shape:
            raise ValueError(
                f"view1 and view2 must have the same shape, got {tuple(view1.shape)} and {tuple(view2.shape)}"
            )
        n = view1.shape[0]
        x = torch.cat([view1, view2], dim=0)
        z = self.online_projector(self.online_encoder(x))
        p = self.predictor(z)
        with torch.no_grad():
            t = self.target_projector(self.target_encoder(x))
        loss = byol_loss(p[:n], t[n:]) + byol_loss(p[n:], t[:n])
        if return_stats:
            return loss, {"collapse": collapse_std(z)}
        return loss

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``target <- tau * target + (1 - tau) * online`` for encoder and projector parameters.

        One fused ``torch._foreach_lerp_`` over all parameters (exact at tau = 0, a copy, and at
        tau = 1, a no-op). Buffers (batch norm running statistics) are not averaged: the target
        keeps its own, updated by its forward passes.
        """
        tau = float(tau)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"invalid tau {tau!r}, must be in [0, 1]")
        target = self._target_params()
        online = [p.detach() for p in self._online_params()]
        torch._foreach_lerp_(target, online, 1.0 - tau)
