"""nanscope.watch.attach under torch.distributed: two gloo ranks, a NaN in rank 1's batch only, a criterion attached.

"skip": both ranks skip the same step (their DDP weights stay equal and finite) and go on; "stop": both
raise NonFiniteStepError at that step, no hang (the test has a timeout); the dumps name rank 1 the origin.
"""

from __future__ import annotations

import gc
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from _spawn import spawn_or_fail

WORLD = 2
PLANT_RANK = 1
PLANT_STEP = 2
STEPS = 5
TIMEOUT_S = 120


class MSE(nn.Module):
    def forward(self, pred, target):
        return {"loss_mse": (pred - target).pow(2).mean()}


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        for policy in ("skip", "stop"):
            _train(rank, Path(out) / policy, policy)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank: int, out: Path, policy: str) -> None:
    from nanscope.watch.attachment import attach
    from nanscope.watch.report import NonFiniteStepError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = MSE()
    result: dict = {"updated": [], "raised_at": None}
    step = 0
    try:
        with attach(crit, out / "dumps", model=model, optimizer=opt, on_nonfinite=policy) as a:
            for step in range(STEPS):
                g = torch.Generator().manual_seed(100 * rank + step)
                x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
                if rank == PLANT_RANK and step == PLANT_STEP:
                    x[1, 2] = float("nan")
                loss = crit(model(x), y)["loss_mse"]
                before = net[0].weight.detach().clone()
                opt.zero_grad()
                loss.backward()  # DDP's all-reduce spreads the NaN gradient to rank 0
                opt.step()
                result["updated"].append(not torch.equal(before, net[0].weight))
    except NonFiniteStepError:
        result["raised_at"] = step
    rep = a.report
    result.update(report=rep.to_dict(), finite=all(torch.isfinite(p).all().item() for p in net.parameters()),
                  weight=net[0].weight.detach().flatten()[:4].tolist())
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("attach-ddp")
    for policy in ("skip", "stop"):
        (tmp_path / policy).mkdir()
    spawn_or_fail(_worker, (str(tmp_path),), WORLD, TIMEOUT_S)
    return tmp_path


def _results(runs: Path, policy: str) -> dict[int, dict]:
    return {r: json.loads((runs / policy / f"rank{r}.json").read_text()) for r in range(WORLD)}


def test_skip_every_rank_skips_the_same_step_and_goes_on(runs: Path) -> None:
    res = _results(runs, "skip")
    for r in range(WORLD):
        expected = [s != PLANT_STEP for s in range(STEPS)]
        assert res[r]["updated"] == expected, r
        assert res[r]["report"]["skipped_steps"] == [PLANT_STEP] and res[r]["finite"]
        assert res[r]["report"]["reports"][0]["origin_ranks"] == [PLANT_RANK]
    assert res[0]["weight"] == res[1]["weight"]  # DDP replicas still agree


def test_stop_every_rank_raises_at_the_same_step_and_the_dumps_name_the_rank(runs: Path) -> None:
    from nanscope.watch.ranks import merge_rank_dumps

    res = _results(runs, "stop")
    for r in range(WORLD):
        assert res[r]["raised_at"] == PLANT_STEP and res[r]["updated"] == [True] * PLANT_STEP, r
        assert res[r]["report"]["stopped"] and res[r]["finite"]
    merged = merge_rank_dumps(runs / "stop" / "dumps")
    assert merged["step"] == PLANT_STEP and merged["origin_ranks"] == [PLANT_RANK] and merged["problems"] == []
    assert merged["ranks"]["1"]["nonfinite_terms"] == ["loss_mse"] and merged["ranks"]["0"]["nonfinite_terms"] == []
