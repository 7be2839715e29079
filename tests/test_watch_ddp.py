"""nanscope.watch under torch.distributed: two gloo ranks, a NaN planted on rank 1 only.

The ranks must stop at the same check without hanging, rank 1 must be named the origin, and
rank 0's dump must say it was not.
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

from nanscope.watch.ranks import Agreement, merge_rank_dumps

WORLD = 2
PLANT_RANK = 1
PLANT_STEP = 3
TIMEOUT_S = 120


SYNC_EVERY = (1, 3)  # read (and agree) at every check, and every third check


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    # a file store: no TCP port to pick (and lose to a neighbour) before the ranks meet
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        for sync_every in SYNC_EVERY:  # one spawn for both: starting two processes costs more than the loops
            _train(rank, Path(out) / f"sync{sync_every}", sync_every)
        gc.collect()  # drop the DDP reducers (they hold the group) before it is destroyed
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def _train(rank: int, out: Path, sync_every: int) -> None:
    from nanscope.watch.sentinel import watch

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stopped = None
    with watch(model, out / "dumps", sync_every=sync_every, on_nonfinite="stop") as w:
        for step in range(12):
            g = torch.Generator().manual_seed(100 * rank + step)
            batch = {"images": torch.randn(4, 8, generator=g), "captions": ["x"] * 4}
            if rank == PLANT_RANK and step == PLANT_STEP:
                batch["images"][1, 2] = float("nan")
            loss = model(batch["images"]).pow(2).mean()
            if not w.check(step, {"loss_mse": loss}, batch):  # before backward: the local loss
                stopped = step
                break
            opt.zero_grad()
            loss.backward()  # DDP's all-reduce spreads a NaN gradient to every rank
            opt.step()
    result = {"stopped": stopped, "report": w.report.to_dict()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("ddp")
    spawn_or_fail(_worker, (str(tmp_path),), WORLD, TIMEOUT_S)
    return tmp_path


@pytest.mark.parametrize("sync_every", SYNC_EVERY)
def test_nan_on_rank_1_stops_both_ranks_and_names_rank_1(runs: Path, sync_every: int) -> None:
    tmp_path = runs / f"sync{sync_every}"
    results = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)}
    expected_stop = PLANT_STEP if sync_every == 1 else 5  # read points: every 3rd check (steps 2, 5, ...)
    for r in range(WORLD):
        rep = results[r]["report"]
        assert results[r]["stopped"] == expected_stop, r  # both ranks stop at the same check
        assert rep["failed"] and rep["step"] == PLANT_STEP and rep["origin_ranks"] == [PLANT_RANK]
        assert rep["origin"] is (r == PLANT_RANK)

    merged = merge_rank_dumps(tmp_path / "dumps")
    assert merged["step"] == PLANT_STEP and merged["origin_ranks"] == [PLANT_RANK] and merged["world_size"] == WORLD
    assert merged["replay"] == str(tmp_path / "dumps" / f"step{PLANT_STEP:08d}-rank{PLANT_RANK}")
    assert merged["ranks"]["1"]["nonfinite_terms"] == ["loss_mse"] and merged["ranks"]["0"]["nonfinite_terms"] == []
    assert merged["problems"] == []

    rank0 = json.loads((tmp_path / "dumps" / f"step{PLANT_STEP:08d}-rank0" / "manifest.json").read_text())
    assert rank0["origin"] is False and rank0["origin_ranks"] == [PLANT_RANK]
    assert rank0["loss_terms"]["loss_mse"] != "nan"
    if sync_every == 1:  # read before the all-reduce: rank 0 never saw a NaN, its weights are still good
        assert rank0["local_first_bad_step"] is None
        assert rank0["files"]["checkpoint"] == "checkpoint.pth"
    else:  # rank 0 went NaN one step later through the all-reduced gradients
        assert rank0["local_first_bad_step"] == PLANT_STEP + 1
    origin = tmp_path / merged["replay"]
    ckpt = torch.load(origin / "checkpoint.pth", weights_only=True)["model"]
    batch = torch.load(origin / "batch.pt", weights_only=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    model.load_state_dict(ckpt)  # keys without DDP's "module." prefix
    assert torch.isnan(model(batch["images"]).pow(2).mean())


def test_origin_prefers_a_nonfinite_loss_over_a_shared_nonfinite_gradient() -> None:
    seen = Agreement(((4, "nonfinite_grad"), (4, "nonfinite_loss"), (None, None), (6, "nonfinite_loss")))
    assert seen.step == 4 and seen.origin_ranks == (1,) and seen.kind == "nonfinite_loss"
    assert Agreement(((None, None), (None, None))).origin_ranks == ()
