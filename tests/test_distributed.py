"""torch.distributed with 2 CPU processes (gloo): the sweep's cells sharded over ranks by torchrun
give the single process's results, and DDP training at batch B per rank equals one process at 2B."""

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


def _ddp_worker(rank: int, world: int, port: int, out: str, steps: int, batch: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init("gloo")
    try:
        sae, src, gamma = _ddp_problem()
        trainer = D.train_ddp(sae, src, _ddp_cfg(steps, batch), gamma=gamma)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}, out)
    finally:
        D.finish()


def _ddp_problem():
    from wsae_core.data import TensorSource
    from wsae_core.models import SAEConfig, build_sae

    g = torch.Generator().manual_seed(0)
    # Sparse non-negative codes on random directions.
    codes = torch.rand(4096, 48, generator=g) * (torch.rand(4096, 48, generator=g) < 0.1)
    x = codes @ torch.randn(48, 16, generator=g)
    return build_sae(SAEConfig(n_p=16, n_m=64, kind="topk", k=4, seed=3)), TensorSource(x), torch.linspace(0.5, 1.5, 16)


def _ddp_cfg(steps: int, batch: int):
    from wsae_core.train import TrainConfig

    # AuxK off: its normalising constant (the residual's variance, models._auxk_factor) is taken
    # over each rank's slice, so with AuxK the ranks' steps differ slightly from the doubled batch.
    return TrainConfig(steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, seed=5, progress=False,
                       dead_steps=4, auxk_coeff=0.0, precision="fp32")


def test_ddp_matches_single_process_with_doubled_batch(tmp_path):
    from wsae_core.train import Trainer

    steps, batch = 30, 64
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), steps, batch), nprocs=2, join=True)
    ddp = torch.load(out)
    sae, src, gamma = _ddp_problem()
    trainer = Trainer(sae, src, _ddp_cfg(steps, 2 * batch), gamma=gamma)
    trainer.fit()
    start = _ddp_problem()[0].state_dict()
    for k, v in sae.state_dict().items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
