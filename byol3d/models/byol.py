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
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from byol3d.models.dense import dense_term
from byol3d.models.encoders import HookedEncoder
from byol3d.models.heads import MLP, DenseHead

logger = logging.getLogger("byol3d")


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
def dense_map_shape(encoder: HookedEncoder, input_shape: Sequence[int]) -> tuple[int, ...]:
    """``(channels, *spatial)`` of ``encoder.dense_layer``'s output for one input of ``input_shape``.

    A dry run with batch size 1 in eval mode, as :meth:`HookedEncoder.feature_dim`.

    Raises:
        ValueError: when the layer's output is not a spatial map ``(B, C, *spatial)`` with the
            input's number of spatial dimensions.
    """
    shape = tuple(int(s) for s in input_shape)
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        _, fmap = encoder.forward_with_map(torch.zeros((1, *shape), device=device))
    finally:
        encoder.train(was_training)
    if fmap.ndim != len(shape) + 1:
        raise ValueError(
            f"dense_layer {encoder.dense_layer!r} gives outputs of shape {tuple(fmap.shape)}, not a "
            f"{len(shape) - 1}D feature map; choose a stage (layer1, layer2, layer3, layer4)"
        )
    if min(fmap.shape[2:]) < 4:
        logger.warning(
            "dense_layer %r is only %s for views of %s: too coarse for a local loss; an earlier "
            "layer (e.g. layer2) or larger crops suit the dense term better",
            encoder.dense_layer,
            "x".join(map(str, fmap.shape[2:])),
            "x".join(map(str, shape[1:])),
        )
    return tuple(fmap.shape[1:])


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
        dense_weight: weight of the dense (local) BYOL term (:mod:`byol3d.models.dense`); 0.0 (the
            default) turns it off, and then the module, its state_dict and its numbers are those
            of plain BYOL. When > 0, :meth:`forward` needs each view's recorded geometry.
        dense_layer: the encoder layer whose spatial output the dense term compares
            (``"layer3"``, stride 16: 8^3 cells at 128^3 crops; prefer ``"layer2"`` for crops
            under about 96 voxels a side).
        dense_grid: points per axis sampled in each overlap (``dense_grid ** spatial_dims``
            points per sample).
        separate_views: forward each view through each network on its own, so batch norm
            normalises over the B samples of one view (the paper's implementation) instead of
            over both views together (2B samples in one concatenated pass, the default).

    Submodules: ``online_encoder``, ``online_projector``, ``predictor`` (trained) and
    ``target_encoder``, ``target_projector`` (``requires_grad=False``, updated only by
    :meth:`update_target`). With ``dense_weight > 0`` also ``online_dense_projector``,
    ``dense_predictor`` (:class:`byol3d.models.heads.DenseHead`, same widths as the global heads) and
    ``target_dense_projector``, its EMA copy. The target runs in the same train/eval mode as the whole module,
    so in training its batch norm uses batch statistics, as in the paper's implementation.
    """

    def __init__(
        self,
        encoder: nn.Module,
        input_shape: Sequence[int],
        hidden_layer: str = "avgpool",
        projection_dim: int = 256,
        hidden_dim: int = 4096,
        dense_weight: float = 0.0,
        dense_layer: str = "layer3",
        dense_grid: int = 4,
        separate_views: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(dense_weight, (int, float)) and 0.0 <= dense_weight < math.inf):
            raise ValueError(f"invalid dense_weight {dense_weight!r}, must be a finite number >= 0")
        if not isinstance(dense_grid, int) or isinstance(dense_grid, bool) or dense_grid < 1:
            raise ValueError(f"invalid dense_grid {dense_grid!r}, must be a positive integer")
        self.dense_weight = float(dense_weight)
        self.dense_grid = dense_grid
        self.separate_views = bool(separate_views)
        self.online_encoder = HookedEncoder(
            encoder, hidden_layer, dense_layer if self.dense_weight > 0 else None
        )
        feature_dim = self.online_encoder.feature_dim(input_shape)
        self.online_projector = MLP(feature_dim, hidden_dim, projection_dim)
        self.predictor = MLP(projection_dim, hidden_dim, projection_dim)
        if self.dense_weight > 0:
            channels = dense_map_shape(self.online_encoder, input_shape)[0]
            dims = len(input_shape) - 1
            self.online_dense_projector = DenseHead(dims, channels, hidden_dim, projection_dim)
            self.dense_predictor = DenseHead(dims, projection_dim, hidden_dim, projection_dim)
            self.target_dense_projector = copy.deepcopy(self.online_dense_projector)
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

    @property
    def wants_geometry(self) -> bool:
        """True when :meth:`forward` needs ``geometry1``/``geometry2`` (the dense term is on)."""
        return self.dense_weight > 0

    def _online_params(self) -> list[torch.Tensor]:
        params = [*self.online_encoder.parameters(), *self.online_projector.parameters()]
        if self.dense_weight > 0:
            params += list(self.online_dense_projector.parameters())
        return params

    def _target_params(self) -> list[torch.Tensor]:
        params = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        if self.dense_weight > 0:
            params += list(self.target_dense_projector.parameters())
        return params

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        return_stats: bool = False,
        geometry1: Mapping[str, torch.Tensor] | None = None,
        geometry2: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetric BYOL loss of two batches of views of the same images.

        By default both views go through each network in one concatenated forward pass: one
        kernel launch per layer instead of two, and batch norm normalises over both views
        together (2B samples). With ``separate_views`` each view goes through alone, as in the
        paper's implementation, so batch statistics come from one view at a time (see
        docs/evaluation.md for what each measured downstream).

        Args:
            view1, view2: ``(B, C, *spatial)`` tensors of equal shape, row i of each being two
                augmentations of sample i.
            return_stats: also return ``{"collapse": collapse_std(online projections)}`` (and
                ``"dense"``, the unweighted dense term, when it is on).
            geometry1, geometry2: only with ``dense_weight > 0`` (then required): each view's
                ``{"box": (B, spatial_dims, 2), "flip": (B, spatial_dims), "rot90": (B,)}`` as
                recorded by the view transforms (:func:`byol3d.training.engine.view_geometry`).

        Returns:
            ``byol_loss(q(z1), z'2) + byol_loss(q(z2), z'1)``, a scalar in [0, 8], plus
            ``dense_weight`` times :func:`byol3d.models.dense.dense_term` when the dense term is on.
        """
        if view1.shape != view2.shape:
            raise ValueError(
                f"view1 and view2 must have the same shape, got {tuple(view1.shape)} and {tuple(view2.shape)}"
            )
        n = view1.shape[0]
        x = torch.cat([view1, view2], dim=0)
        if self.dense_weight > 0:
            if geometry1 is None or geometry2 is None:
                raise ValueError(
                    "dense_weight > 0: forward needs geometry1 and geometry2, each view's recorded "
                    "box/flip/rot90 (see byol3d.training.engine.view_geometry)"
                )
            return self._forward_dense(x, n, geometry1, geometry2, return_stats)
        z = self._per_view(lambda v: self.online_projector(self.online_encoder(v)), x, n)
        p = self._per_view(self.predictor, z, n)
        with torch.no_grad():
            t = self._per_view(lambda v: self.target_projector(self.target_encoder(v)), x, n)
        loss = byol_loss(p[:n], t[n:]) + byol_loss(p[n:], t[:n])
        if return_stats:
            return loss, {"collapse": collapse_std(z)}
        return loss

    def _per_view(self, fn, x: torch.Tensor, n: int):
        """``fn(x)`` on the concatenated views, or on each view alone with ``separate_views``.

        ``fn`` returns a tensor or a tuple of tensors (batch first); halves are concatenated
        back, so the caller sees rows 0..n-1 for view 1 and n..2n-1 for view 2 either way.
        """
        if not self.separate_views:
            return fn(x)
        a, b = fn(x[:n]), fn(x[n:])
        if isinstance(a, tuple):
            return tuple(torch.cat(pair) for pair in zip(a, b))
        return torch.cat([a, b])

    def _forward_dense(self, x, n, geometry1, geometry2, return_stats):
        h, fmap = self._per_view(self.online_encoder.forward_with_map, x, n)
        z = self._per_view(self.online_projector, h, n)
        p = self._per_view(self.predictor, z, n)
        dense_p = self._per_view(lambda f: self.dense_predictor(self.online_dense_projector(f)), fmap, n)  # fmt: skip
        with torch.no_grad():
            th, tmap = self._per_view(self.target_encoder.forward_with_map, x, n)
            t = self._per_view(self.target_projector, th, n)
            dense_t = self._per_view(self.target_dense_projector, tmap, n)
        dense = dense_term(
            dense_p,
            dense_t,
            geometry1,
            geometry2,
            grid=self.dense_grid,
            view_shape=x.shape[2:],
            cells=self.online_encoder.dense_cells,
        )
        loss = byol_loss(p[:n], t[n:]) + byol_loss(p[n:], t[:n]) + self.dense_weight * dense
        if return_stats:
            return loss, {"collapse": collapse_std(z), "dense": dense.detach()}
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
