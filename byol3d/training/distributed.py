"""Scale-out through ``ignite.distributed``: launching, wrapping the model, sharding the data.

Two ways to run ``byol3d pretrain`` on several processes (one per GPU, or CPU processes with
the gloo backend):

    byol3d pretrain CONFIG --nproc-per-node 4                       # spawns 4 processes here
    torchrun --nproc-per-node 4 -m byol3d pretrain CONFIG           # torchrun starts them

Both go through ``idist.Parallel``; inside, :func:`wrap_model` applies ``idist.auto_model``
(DDP, optional SyncBatchNorm) and :func:`make_loader` a DataLoader with a
seeded ``DistributedSampler``. ``train.batch_size`` stays per process: the global batch is
``batch_size x world size``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
from monai.data import DataLoader
from monai.data.utils import worker_init_fn
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, SequentialSampler

from byol3d.data.datasets import SeededSampler, ViewDataset


def world_size() -> int:
    return idist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return idist.get_rank() == 0


def wants_distributed(nproc_per_node: int | None) -> bool:
    """A launch was asked for (``--nproc-per-node`` > 1) or torchrun set up the environment."""
    return (nproc_per_node or 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the spawned processes' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nproc_per_node: int | None = None,
    backend: str | None = None,
) -> None:
    """Run ``fn(*args)`` on every process of a distributed run (``idist.Parallel``).

    Args:
        fn: called as ``fn(local_rank, *args)`` in each process.
        nproc_per_node: processes to spawn on this machine (rendezvous on a free local port,
            or on ``MASTER_PORT`` when set); ``None`` under torchrun.
        backend: ``"nccl"`` for GPUs, ``"gloo"`` for CPU; default: nccl when CUDA is available.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    spawn = (
        {"nproc_per_node": nproc_per_node}
        if nproc_per_node and "WORLD_SIZE" not in os.environ
        else {}
    )
    if spawn and "MASTER_PORT" not in os.environ:
        # a free port rather than ignite's fixed default, so two runs on one machine coexist
        spawn.update(master_addr="127.0.0.1", master_port=free_port())
    with idist.Parallel(backend=backend, **spawn) as parallel:
        parallel.run(fn, *args)


def wrap_model(
    model: nn.Module, sync_bn: bool = True, find_unused_parameters: bool = False
) -> nn.Module:
    """DDP (through ``idist.auto_model``) when distributed, with SyncBatchNorm if ``sync_bn``.

    With batches of 2-8 volumes per GPU, per-GPU batch-norm statistics are noisy; SyncBatchNorm
    computes them over the global batch. In a single process the model is returned as is.
    """
    if world_size() <= 1:
        return model
    return idist.auto_model(model, sync_bn=sync_bn, find_unused_parameters=find_unused_parameters)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A loader of ``batch_size`` samples per process; sharded by rank when distributed.

    Workers persist across epochs (``persistent_workers``: no re-fork per epoch). A
    :class:`~byol3d.data.datasets.ViewDataset` is sampled through a
    :class:`~byol3d.data.datasets.SeededSampler`, so its views depend on the epoch's seed and
    the index only, not on which worker drew them (other datasets get MONAI's
    ``worker_init_fn`` seeding). In a distributed run the ``DistributedSampler`` is seeded with ``seed`` and needs
    ``loader.sampler.set_epoch(epoch)`` at each epoch start (:func:`byol3d.training.pretrain.pretrain` does it).
    ``collate_fn`` replaces MONAI's ``list_data_collate`` (e.g.
    :func:`byol3d.transforms.batched.collate_boxes`).
    """
    extra = {} if collate_fn is None else {"collate_fn": collate_fn}
    if world_size() > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size(),
            rank=idist.get_rank(),
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
    else:
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    if isinstance(dataset, ViewDataset):
        sampler = SeededSampler(sampler, seed=seed, rank=idist.get_rank())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn,
        **extra,
    )
