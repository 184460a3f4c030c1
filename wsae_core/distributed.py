"""Scale-out on ``torch.distributed``: a sweep's cells over ranks, and one SAE trained data-parallel.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous);
without it every function here is the single-process case (rank 0 of 1), so the same code runs
either way. Backend: NCCL when CUDA is available, else gloo (CPU)::

    # one machine, 4 processes
    torchrun --nproc-per-node 4 -m wsae_core.experiments lm --profile book
    # two machines with 8 GPUs each (run on both; node-rank 0 and 1); the cache root must be a shared
    # folder, or each machine builds its own copy of the activation cache (same numbers)
    torchrun --nnodes 2 --node-rank {0|1} --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 -m wsae_core.experiments lm --profile paper

Cells are independent, so rank ``r`` of ``N`` simply takes cells ``r, r + N, ...`` (:func:`shard`).
One large SAE trains data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel`
(:func:`train_ddp`): every rank draws the same global batch and keeps its slice, and every batch
statistic of the training step (the decoder bias's start, the dead latents, the AuxK loss's
normaliser) is taken over the global batch, so ``N`` ranks at batch ``B`` take the same steps as one
process at batch ``N·B``, AuxK included (tested: equal weights to float32 rounding, rtol 1e-4).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .train import Trainer

__all__ = ["init", "finish", "rank_and_world", "local_rank", "barrier", "shard", "gather_objects",
           "default_device", "ShardedSource", "train_ddp"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it or
    when already joined). ``backend`` None: NCCL with CUDA, else gloo. Returns whether distributed."""
    if _active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def finish() -> None:
    """Leave the process group (if any)."""
    if _active():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items ``rank, rank + world, ...``: a round-robin share, so that neighbouring (similar-cost)
    items land on different ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world - 1}] for world size {world}, got {rank}")
    return list(items[rank::world])


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (JSON-like objects; ``[obj]`` alone)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def default_device(device: str) -> str:
    """``device``, with a bare ``cuda`` pinned to this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    return f"cuda:{local_rank()}" if device == "cuda" and _active() else device


class ShardedSource:
    """Rank ``rank``'s slice of the global batch of ``source``: ``sample(batch)`` draws ``world·batch``
    rows from ``source`` with the generator (seeded alike on every rank, so all ranks draw the same
    global batch) and returns rows ``[rank·batch, (rank + 1)·batch)``."""

    def __init__(self, source: Any, rank: int, world: int):
        if not hasattr(source, "sample"):
            raise TypeError(f"source must have a sample(batch, generator) method, got {type(source).__name__}")
        shard(range(world), rank, world)  # validates rank and world
        self.source, self.rank, self.world = source, rank, world
        self.n_p = getattr(source, "n_p", None)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        x = self.source.sample(batch * self.world, generator)
        return x[self.rank * batch : (self.rank + 1) * batch]


class _Wrapped(torch.nn.parallel.DistributedDataParallel):
    """DDP that still shows the SAE's attributes (``cfg``, ``b_dec``, ``after_step``...) to the trainer."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def train_ddp(sae: torch.nn.Module, source: Any, cfg: Any, gamma: Any = None) -> Any:
    """Train ``sae`` data-parallel over the process group: ``cfg.batch_size`` is the batch **per
    rank**; returns the :class:`~wsae_core.train.Trainer` (its ``model`` is the DDP wrapper,
    ``sae`` is trained in place and equal on every rank).

    Every rank draws the same global batch from ``source`` (same ``cfg.seed``) and trains on its
    slice (:class:`ShardedSource`). Each rank's loss is a mean over its slice and the slices are
    equal, so the gradients that DDP averages over the ranks are the gradient of the mean loss over
    the global batch. What a single process computes from its whole batch is made global: the
    decoder bias starts at the mean of the first global batch; a latent counts as fired at a step if
    it fired on any rank (AuxK's dead latents are the same everywhere); and the AuxK loss is
    normalised by the variances of the global batch and of its residual (two all-reduces of
    ``2 n_p + 3`` numbers in the Top-k forward, :attr:`~wsae_core.models.PracticalSAE.sync_batch_stats`),
    not by those of the rank's slice. The constant that normalisation makes is the same on every
    rank, so the averaged AuxK gradient is the global batch's too. The reconstruction and L1 terms
    are plain per-sample means and need nothing. ``history`` records what each rank saw on its
    slice (loss, FVU against the slice's variance, L0): logged, not trained on. A non-finite batch or
    loss, or a diverging loss, on one rank stops every rank at the same step with
    :class:`~wsae_core.checks.NonFiniteError` (one all-reduced flag per check), so none is left
    waiting in a collective until the group's timeout.
    """
    from dataclasses import replace

    rank, world = rank_and_world()
    device = torch.device(cfg.device)
    if getattr(cfg, "b_dec_init", None) in (None, "mean") and sae.cfg.kind != "theory":
        with torch.no_grad():  # the mean of the first global batch, drawn from a copy of the generator
            first = source.sample(cfg.batch_size * world, torch.Generator().manual_seed(cfg.seed))
            sae.b_dec.copy_(first.float().mean(0))
        cfg = replace(cfg, b_dec_init="keep")
        if hasattr(source, "_perm"):  # a CacheSource: start its passes afresh, as the single process does
            source._perm, source._pos = None, 0
    sae = sae.to(device)
    model = _Wrapped(sae, device_ids=[device.index] if device.type == "cuda" else None) if _active() else sae
    trainer = _SyncedTrainer(model, ShardedSource(source, rank, world), cfg, gamma=gamma)
    trainer.fit()
    return trainer


class _SyncedTrainer(Trainer):
    """A :class:`~wsae_core.train.Trainer` whose dead-latent counts and AuxK normaliser are those of
    the global batch (the SAE's ``sync_batch_stats`` is on while it fits)."""

    def fit(self, until: int | None = None) -> list[dict]:
        sae = getattr(self.model, "module", self.model)
        if not _active() or not hasattr(sae, "sync_batch_stats"):
            return super().fit(until)
        sae.sync_batch_stats = True
        try:
            return super().fit(until)
        finally:
            sae.sync_batch_stats = False

    def _stop_everywhere(self, stop: bool) -> bool:
        if not _active():
            return stop
        flag = torch.tensor([float(stop)], device=self.device)  # one number: NCCL needs it on the GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _track_dead(self, out) -> None:
        if not _active():
            return super()._track_dead(out)
        fired = torch.zeros(self.steps_since_fired.numel(), dtype=torch.float32, device=out.latents.device)
        if out.latent_indices is None:
            fired += (out.latents > 0).any(0).float()
        else:
            fired[out.latent_indices[out.latents > 0]] = 1.0
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.steps_since_fired += 1
        self.steps_since_fired[fired.cpu() > 0] = 0
