"""Online kNN monitor: how well the encoder being trained separates labelled volumes, per epoch.

Enabled by ``train.knn_csv`` (a labels CSV as for ``byol3d evaluate``: ``path`` or ``id`` and
``label``; relative paths from the CSV's folder) and ``train.knn_every`` (epochs). Every
``knn_every`` epochs the online encoder (eval mode, no gradients, on the training device)
embeds the labelled volumes with the run's deterministic preprocessing and sliding windows
(no overlap, to stay cheap), and the leave-one-out accuracy of a ``k``-nearest-neighbour
vote (cosine similarity of the embeddings, ``k = 5`` or fewer for tiny sets) is logged:
``knn_acc`` in ``epochs.csv`` and ``epoch/knn_acc`` in TensorBoard. The preprocessed volumes
are kept in memory after the first pass. A falling or chance-level ``knn_acc`` while the loss
falls is a sign that BYOL learns something other than what the labels need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from byol3d.evaluate import read_image_csv

__all__ = ["KnnMonitor", "loo_knn_accuracy"]

logger = logging.getLogger("byol3d")


def loo_knn_accuracy(features: torch.Tensor, labels: Sequence, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-NN majority vote under cosine similarity.

    Ties between classes go to the class whose votes have the larger summed similarity.

    >>> f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> loo_knn_accuracy(f, [0, 0, 1, 1], k=1)
    1.0
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError("the kNN monitor needs at least 2 labelled volumes")
    k = max(1, min(k, n - 1))
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    f = nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    top_sim, top = sim.topk(k, dim=1)
    votes = torch.zeros(n, len(classes), dtype=torch.float64)
    votes.scatter_add_(1, y[top], torch.ones_like(top_sim))
    votes += 1e-6 * torch.zeros_like(votes).scatter_add_(1, y[top], top_sim)  # tie-break
    return float((votes.argmax(1) == y).double().mean())


class KnnMonitor:
    """Logs the leave-one-out kNN accuracy of ``encoder`` on a labelled CSV every few epochs.

    Args:
        encoder: the online encoder (a MONAI ResNet; its ``layer4`` map is pooled).
        csv_path: labels CSV (see :func:`byol3d.evaluate.read_image_csv`).
        preprocess: the run's deterministic preprocessing (``build_transforms(cfg)[0]``).
        roi_size: sliding-window size (the crop size).
        every: epochs between evaluations (>= 1).
        k: neighbours.
        device: where the encoder lives.
        writer: an optional TensorBoard ``SummaryWriter``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        csv_path: str,
        preprocess: Callable,
        roi_size: Sequence[int],
        every: int = 1,
        k: int = 5,
        device: torch.device | str = "cpu",
        writer=None,
    ) -> None:
        if every < 1:
            raise ValueError(f"invalid every {every!r}, must be >= 1")
        self.rows = read_image_csv(csv_path)
        self.encoder, self.preprocess, self.roi_size = encoder, preprocess, tuple(roi_size)
        self.every, self.k, self.device, self.writer = every, k, torch.device(device), writer
        self._images: list[torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    def accuracy(self) -> float:
        """Embed the labelled volumes with the current weights and return the LOO kNN accuracy."""
        from byol3d.features import extract_features

        if self._images is None:
            self._images = [self.preprocess({"image": r["path"]})["image"] for r in self.rows]
        feats = extract_features(
            self.encoder, self._images, roi_size=self.roi_size, overlap=0.0, device=self.device
        )
        return loo_knn_accuracy(torch.from_numpy(feats), [r["label"] for r in self.rows], self.k)

    def __call__(self, engine: Engine) -> None:
        acc = self.accuracy()
        engine.state.metrics["knn_acc"] = acc
        if self.writer is not None:
            self.writer.add_scalar("epoch/knn_acc", acc, engine.state.iteration)
        logger.info("epoch %d: kNN accuracy %.3f on %d labelled volumes", engine.state.epoch, acc, len(self.rows))  # fmt: skip
