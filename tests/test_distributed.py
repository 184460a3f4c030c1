"""torch.distributed with 2 CPU processes (gloo): the sweep's cells sharded over ranks by torchrun
give the single process's results, and DDP training at batch B per rank equals one process at 2B
(AuxK included: its normaliser is all-reduced to the global batch's)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from wsae_core import distributed as D

ROOT = Path(__file__).resolve().parents[1]
# A small sweep of the ci profile: 2 rules x 2 seeds + rule (d), which reads its seed's plain SAE
# (so the second round after the barrier is exercised).
SWEEP_ARGS = ["--profile", "ci", "--layers", "1", "--methods", "SAE", "WSAE α=1", "WSAE learned oracle",
              "--seeds", "0", "1"]
COMPARED = ("fvu", "weighted_fvu", "l0", "dead", "ce_recovered", "kl", "topic_consistency", "embedding_coherence")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WSAE_PROFILE": "ci", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def test_shard_and_single_process_helpers():
    assert D.shard(list("abcdefg"), 1, 3) == ["b", "e"]
    assert sorted(sum((D.shard(range(10), r, 4) for r in range(4)), [])) == list(range(10))
    with pytest.raises(ValueError, match="rank must be in \\[0, 1\\] for world size 2, got 2"):
        D.shard([1], 2, 2)
    assert D.rank_and_world() == (0, 1) and D.gather_objects({"a": 1}) == [{"a": 1}]
    D.barrier()  # a no-op outside a process group


def test_sharded_sweep_equals_single_process(tmp_path):
    """torchrun --nproc-per-node 2 over the cells: same records as one process, every cell once."""
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    base = [sys.executable, "-m", "wsae_core.experiments", "lm", *SWEEP_ARGS]
    subprocess.run([*base, "--cache-root", str(tmp_path / "a"), "--out", str(single)], check=True, cwd=ROOT,
                   env=_env(), capture_output=True, timeout=600)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "wsae_core.experiments", "lm", *SWEEP_ARGS,
                          "--cache-root", str(tmp_path / "b"), "--out", str(sharded)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert not a["missing"] and not b["missing"]
    key = lambda r: r["cell"]  # noqa: E731
    ra, rb = sorted(a["records"], key=key), sorted(b["records"], key=key)
    assert [r["cell"] for r in ra] == [r["cell"] for r in rb] and len(ra) == 6
    for x, y in zip(ra, rb):
        for m in COMPARED:
            assert y[m] == pytest.approx(x[m], rel=1e-5, abs=1e-7), (x["cell"], m)
        assert y["gamma"] == x["gamma"]
    assert {r["rank"] for r in ra} == {0} and {r["rank"] for r in rb} == {0, 1}


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init("gloo")


def _ddp_worker(rank: int, world: int, port: int, out: str, steps: int, batch: int):
    _join(rank, world, port)
    try:
        sae, src, gamma = _ddp_problem()
        trainer = D.train_ddp(sae, src, _ddp_cfg(steps, batch), gamma=gamma)
        assert not sae.sync_batch_stats  # on only while fitting
        if rank == 0:
            state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
            torch.save({"state": state, "history": trainer.history}, out)
    finally:
        D.finish()


def _ddp_problem():
    from wsae_core.data import TensorSource
    from wsae_core.models import SAEConfig, build_sae

    g = torch.Generator().manual_seed(0)
    # Sparse non-negative codes on random directions.
    codes = torch.rand(4096, 48, generator=g) * (torch.rand(4096, 48, generator=g) < 0.1)
    x = codes @ torch.randn(48, 16, generator=g)
    sae = build_sae(SAEConfig(n_p=16, n_m=256, kind="topk", k=2, seed=3))  # wide and sparse: latents die
    return sae, TensorSource(x), torch.linspace(0.5, 1.5, 16)


def _ddp_cfg(steps: int, batch: int):
    from wsae_core.train import TrainConfig

    # AuxK on with a strong coefficient and a short dead horizon, so that latents die within the run
    # and the AuxK term (its normaliser is a global-batch statistic under DDP) moves the weights.
    return TrainConfig(steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, seed=5, progress=False,
                       dead_steps=4, auxk_coeff=0.5, log_every=1, precision="fp32")


def test_ddp_matches_single_process_with_doubled_batch(tmp_path):
    """2 ranks at batch 64 take the steps of one process at batch 128, with AuxK working on dead latents."""
    from wsae_core.train import Trainer

    steps, batch = 30, 64
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), steps, batch), nprocs=2, join=True)
    ddp = torch.load(out)
    sae, src, gamma = _ddp_problem()
    trainer = Trainer(sae, src, _ddp_cfg(steps, 2 * batch), gamma=gamma)
    trainer.fit()
    for hist in (trainer.history, ddp["history"]):  # AuxK was at work, in both runs
        assert sum(h["auxk_loss"] > 0 for h in hist) >= steps // 2 and max(h["dead_fraction"] for h in hist) > 0
    start = _ddp_problem()[0].state_dict()
    for k, v in sae.state_dict().items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def _auxk_worker(rank: int, world: int, port: int, out: str):
    """Each rank's AuxK loss and its gradient on its slice, averaged over the ranks as DDP does,
    with and without the global normaliser, for the fused and the autograd Top-k."""
    _join(rank, world, port)
    try:
        x, gamma, dead = _auxk_problem()
        part = x.chunk(world)[rank]
        res = {}
        for fused in (True, False):
            for sync in (True, False):
                res[fused, sync] = _auxk_loss_and_grads(part, gamma, dead, fused, sync)
                torch.distributed.all_reduce(res[fused, sync])
                res[fused, sync] /= world
        if rank == 0:
            torch.save(res, out)
    finally:
        D.finish()


def _auxk_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 16, generator=g) * torch.linspace(0.2, 3.0, 16) + 1.5
    x[48:] *= 2.0  # the two ranks' slices differ in spread, so a slice's variances are not the batch's
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=g)[:40]] = True
    return x, torch.linspace(0.5, 1.5, 16), dead


def _auxk_loss_and_grads(x, gamma, dead, fused: bool, sync: bool) -> torch.Tensor:
    from wsae_core.models import PracticalSAE, SAEConfig

    sae = PracticalSAE(SAEConfig(n_p=16, n_m=64, kind="topk", k=4, seed=3), fused=fused)
    sae.sync_batch_stats = sync
    out = sae(x, gamma, dead, 8)
    grads = torch.autograd.grad(out.auxk_loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    return torch.cat([out.auxk_loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])


def test_ddp_auxk_loss_and_gradient_are_the_global_batchs(tmp_path):
    """The rank-averaged AuxK loss and gradient equal one process's on the whole batch only with the
    all-reduced normaliser (the check fails without it: the slices' variances differ)."""
    out = tmp_path / "auxk.pt"
    mp.spawn(_auxk_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    x, gamma, dead = _auxk_problem()
    for fused in (True, False):
        whole = _auxk_loss_and_grads(x, gamma, dead, fused, sync=False)
        assert whole[0] > 0
        torch.testing.assert_close(res[fused, True], whole, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(res[fused, False], whole, rtol=1e-2, atol=1e-4)  # the slices' own normalisers


class _NaNOnRank1:
    """A source whose 4th global batch has a NaN in rank 1's half only (rows [batch, 2 batch))."""

    def __init__(self, source, batch: int):
        self.source, self.batch, self.calls, self.n_p = source, batch, 0, source.n_p

    def sample(self, n: int, generator=None):
        x = self.source.sample(n, generator)
        self.calls += 1
        if self.calls == 4:
            x[self.batch + 1, 2] = float("nan")
        return x


def _nan_worker(rank: int, world: int, port: int, out: str, batch: int):
    from datetime import timedelta

    import torch.distributed as dist

    from wsae_core.checks import NonFiniteError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test in seconds, not half an hour.
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    try:
        sae, src, gamma = _ddp_problem()
        try:
            D.train_ddp(sae, _NaNOnRank1(src, batch), _ddp_cfg(10, batch), gamma=gamma)
            message = "finished"
        except NonFiniteError as e:
            message = str(e)
        Path(f"{out}.{rank}").write_text(message)
    finally:
        D.finish()


def test_ddp_nonfinite_batch_on_one_rank_stops_every_rank(tmp_path):
    """A NaN in one rank's slice stops both ranks at the same step (none hangs in the gradient all-reduce)."""
    batch = 32
    mp.spawn(_nan_worker, args=(2, _free_port(), str(tmp_path / "msg"), batch), nprocs=2, join=True)
    m0, m1 = (tmp_path / "msg.0").read_text(), (tmp_path / "msg.1").read_text()
    # The 4th batch is drawn at step 2 (the first is b_dec's starting mean).
    assert m1.startswith("step 2: the batch from the data source") and "row 1, column 2" in m1, m1
    assert m0.startswith("step 2: another process of the group stopped"), m0
