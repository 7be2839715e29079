"""nanscope.watch.attach on a sharded model: two gloo ranks run the demo GroundingDINO under FSDP2 (`fully_shard`)
and FSDP1 (`FullyShardedDataParallel`), a NaN pixel in rank 1's batch of step 1 only, a criterion attached.

Both ranks stop at step 1 (no hang: the spawn has a timeout); the origin rank's dump holds the FULL weights,
equal to each rank's shards (recorded by the test before the step) put back together, and under the plain
model's keys; `nanscope inspect DUMP/` replays it to the same finding as the dump of the same step of an
unsharded run of the same two steps. On an MLP: FSDP1 with flat parameters and nested wrapping, and FSDP2 on
submodules only, dump the weights kept before sharding.
"""

from __future__ import annotations

import copy
import gc
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from _spawn import spawn_or_fail
from test_attach import CRITERIA, PLANT, Criterion, step_inputs
from test_attach_ddp import MSE

from nanscope.cli import main
from nanscope.errors import InputError
from nanscope.stacks.groundingdino.stack import build_model
from nanscope.watch.attachment import attach
from nanscope.watch.ranks import merge_rank_dumps
from nanscope.watch.report import NonFiniteStepError
from nanscope.watch.sentinel import watch

WORLD = 2
PLANT_RANK = 1
STEPS = 3
KINDS = ("fsdp2", "fsdp1")
TIMEOUT_S = 240  # a hang fails the test; the ranks take 30-60 s on a shared 2-core box


def _one_image(model: torch.nn.Module, step: int, plant: int | None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """test_attach's batch of `step` cut to its image 1 (the one that gets the NaN pixel): half the compute."""
    b, targets = step_inputs(model, step, plant)
    return b.images[1:], list(b.captions[1:]), targets[1:]


def _demo_model(demo: dict) -> torch.nn.Module:
    m, _ = build_model(demo["config"], text_encoder=demo["text_encoder"], seed=0)
    m.load_state_dict(torch.load(demo["checkpoint"], weights_only=True)["model"])
    return m.train()


def _local_shards(m: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """This rank's part of each parameter, read without FSDP's state-dict code: FSDP2's DTensor local shard
    (dim 0), FSDP1's (use_orig_params) 1-D slice of the flat parameter."""
    if kind == "fsdp2":
        return {n: p.to_local().detach().clone() for n, p in m.named_parameters()}
    return {n: p.detach().reshape(-1).clone() for n, p in m.named_parameters()}


def _shard(m: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(m, mesh=init_device_mesh("cpu", (WORLD,)))
        return m
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(m, device_id=torch.device("cpu"), use_orig_params=True)


def _worker(rank: int, out: str, demo: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=90))
    try:
        base = _demo_model(demo)
        for kind in KINDS:  # one spawn for both: building the model costs more than the steps
            _train(rank, Path(out) / kind, kind, copy.deepcopy(base), demo)
            gc.collect()
        _send_odd_tensors(rank, Path(out))
        for kind in ("fsdp1-flat", "fsdp2-parts"):
            _small(rank, Path(out), kind)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank: int, out: Path, kind: str, m: torch.nn.Module, demo: dict) -> None:
    model = _shard(m, kind)
    inner = m  # FSDP2 shards in place; FSDP1 wraps
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    crit = Criterion()
    result: dict = {"raised_at": None, "steps_run": [], "keep_weights": None}
    try:  # a weight copy of this rank's shards would be no checkpoint: refused when the watcher is made
        watch(model, out / "refused", keep_weights=True)
    except InputError as exc:
        result["keep_weights"] = str(exc)
    shards: dict[str, torch.Tensor] = {}
    torch.manual_seed(0)  # the text encoder's dropout draws the same masks as in the unsharded run
    with attach(crit, out / "dumps", model=model, config=demo["config"], text_encoder=demo["text_encoder"]) as a:
        try:
            for step in range(STEPS):
                shards = _local_shards(inner, kind)  # the weights a dump of this step must hold
                images, captions, targets = _one_image(inner, step, PLANT if rank == PLANT_RANK else None)
                terms = crit(model(images, captions=captions), targets)
                opt.zero_grad()
                sum(terms.values()).backward()
                opt.step()
                result["steps_run"].append(step)
        except NonFiniteStepError:
            result["raised_at"] = step
    result["report"] = a.report.to_dict()
    torch.save(shards, out / f"shards-rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"mask": torch.rand(3, 5, generator=g) > 0.5, "half": torch.randn(7, generator=g).to(torch.bfloat16),
            "count": torch.tensor(12345678901, dtype=torch.int64), "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(float("nan")), "strided": torch.arange(12.0).view(3, 4).t()}


def _send_odd_tensors(rank: int, out: Path) -> None:
    """The weights' trip from the rank that gathered them to the origin rank, for dtypes gloo cannot send."""
    from nanscope.watch.ranks import rank_context
    from nanscope.watch.sharding import _receive, _send

    ctx = rank_context()
    if rank == 0:
        _send(_odd_tensors(), ctx, 1)
    else:
        torch.save(_receive(ctx, 0), out / "received.pt")


def _small(rank: int, out: Path, kind: str) -> None:
    """Other wrappings, on an MLP: FSDP1 with flat parameters (use_orig_params=False), nested by an auto-wrap
    policy; FSDP2 on two submodules only (the root is a plain Sequential). A NaN input on rank 1 at step 0."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 1)))
    torch.save(net.state_dict(), out / f"{kind}-initial.pt")
    if kind == "fsdp1-flat":
        model = FullyShardedDataParallel(net, device_id=torch.device("cpu"),
                                         auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(net[0], mesh=mesh)
        fully_shard(net[2], mesh=mesh)
        model = net
    crit = MSE()
    g = torch.Generator().manual_seed(rank)
    with pytest.raises(NonFiniteStepError):
        with attach(crit, out / kind, model=model):
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
            if rank == PLANT_RANK:
                x[0, 0] = float("nan")
            crit(model(x), y)["loss_mse"].backward()


@pytest.fixture(scope="module")
def runs(demo_files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("attach-fsdp")
    for kind in KINDS:
        (tmp_path / kind).mkdir()
    demo = {"config": str(demo_files.config), "text_encoder": str(demo_files.text_encoder),
            "checkpoint": str(demo_files.checkpoint)}
    spawn_or_fail(_worker, (str(tmp_path), demo), WORLD, TIMEOUT_S)
    return tmp_path


@pytest.fixture(scope="module")
def plain_dump(demo_files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two steps (rank 1's batches) without sharding, in this process: the dump to compare with."""
    m = _demo_model({"config": demo_files.config, "text_encoder": demo_files.text_encoder,
                     "checkpoint": demo_files.checkpoint})
    opt = torch.optim.SGD(m.parameters(), lr=1e-4)
    crit = Criterion()
    torch.manual_seed(0)
    with pytest.raises(NonFiniteStepError) as info:
        with attach(crit, tmp_path_factory.mktemp("plain") / "dumps", model=m, config=demo_files.config,
                    text_encoder=demo_files.text_encoder):
            for step in range(STEPS):
                images, captions, targets = _one_image(m, step, PLANT)
                terms = crit(m(images, captions=captions), targets)
                opt.zero_grad()
                sum(terms.values()).backward()
                opt.step()
    return info.value.report.dump


def _first_finding(dump: Path) -> dict:
    out = dump.parent / f"{dump.name}.json"
    assert main(["inspect", str(dump), "--criterion", f"{CRITERIA}:masked", "--no-isolate", "--json", str(out)]) == 1
    return json.loads(out.read_text())["findings"][0]


@pytest.fixture(scope="module")
def plain_finding(plain_dump: Path) -> dict:
    return _first_finding(plain_dump)


def _gathered(runs: Path, kind: str, shape: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Each parameter from the ranks' shards, concatenated in rank order."""
    parts = [torch.load(runs / kind / f"shards-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    if kind == "fsdp2":
        return {n: torch.cat([p[n] for p in parts], dim=0) for n in parts[0]}
    return {n: torch.cat([p[n] for p in parts]).view(shape[n]) for n in parts[0]}


@pytest.mark.parametrize("kind", KINDS)
def test_both_ranks_stop_at_the_planted_step_and_the_origin_dump_holds_the_full_weights(
        runs: Path, plain_dump: Path, plain_finding: dict, demo_files, kind: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    res = {r: json.loads((runs / kind / f"rank{r}.json").read_text()) for r in range(WORLD)}
    for r in range(WORLD):
        assert res[r]["raised_at"] == PLANT and res[r]["steps_run"] == list(range(PLANT)), r
        assert res[r]["report"]["stopped"] and res[r]["report"]["nonfinite_steps"] == [PLANT]
        assert f"keep_weights=True with a model sharded by {kind.upper()}" in res[r]["keep_weights"]

    dumps = runs / kind / "dumps"
    merged = merge_rank_dumps(dumps)
    origin = dumps / f"step{PLANT:08d}-rank{PLANT_RANK}"
    assert merged["step"] == PLANT and merged["origin_ranks"] == [PLANT_RANK] and merged["problems"] == []
    assert merged["replay"] == str(origin)
    manifest = json.loads((origin / "manifest.json").read_text())
    assert manifest["sharding"] == kind and manifest["rank"] == PLANT_RANK and manifest["origin"] is True
    assert manifest["model"]["class"] == "GroundingDINO" and manifest["stack"]["model_class"] == "GroundingDINO"
    rank0 = json.loads((dumps / f"step{PLANT:08d}-rank0" / "manifest.json").read_text())
    assert rank0["files"]["checkpoint"] is None and any(f"rank {PLANT_RANK}'s dump" in n for n in rank0["notes"])

    ckpt = torch.load(origin / "checkpoint.pth", weights_only=True)["model"]
    plain = torch.load(plain_dump / "checkpoint.pth", weights_only=True)["model"]
    assert set(ckpt) == set(plain)  # the plain model's keys: no _fsdp_wrapped_module. / _orig_mod. prefixes
    gathered = _gathered(runs, kind, {k: v.shape for k, v in plain.items()})
    assert gathered.keys() < ckpt.keys()  # the parameters; the rest are buffers
    for name, full in gathered.items():
        assert torch.equal(ckpt[name], full), name  # exactly the shards, put back together
    initial = torch.load(demo_files.checkpoint, weights_only=True)["model"]
    assert any(not torch.equal(ckpt[n], initial[n]) for n in gathered)  # step 0's update is in them
    for name, value in plain.items():  # the unsharded run's weights after the same step 0
        torch.testing.assert_close(ckpt[name], value, rtol=1e-4, atol=1e-6, msg=name)

    sharded = _first_finding(origin)
    capsys.readouterr()
    assert sharded["code"] == plain_finding["code"] == "NS304"  # the NaN pixel, found where it is
    assert sharded["where"] == plain_finding["where"] and {"image": 0, "channel": 2}.items() <= sharded["where"][0].items()


def test_the_weights_reach_the_origin_rank_bit_for_bit_in_every_dtype(runs: Path) -> None:
    got, sent = torch.load(runs / "received.pt", weights_only=True), _odd_tensors()
    assert list(got) == list(sent)
    for name, t in sent.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("kind", ["fsdp1-flat", "fsdp2-parts"])
def test_flat_parameters_and_sharded_submodules_dump_the_plain_models_weights(runs: Path, kind: str) -> None:
    merged = merge_rank_dumps(runs / kind)
    assert merged["step"] == 0 and merged["origin_ranks"] == [PLANT_RANK] and merged["problems"] == []
    ckpt = torch.load(Path(merged["replay"]) / "checkpoint.pth", weights_only=True)["model"]
    initial = torch.load(runs / f"{kind}-initial.pt", weights_only=True)  # kept before sharding
    assert list(ckpt) == list(initial) and all(torch.equal(ckpt[k], initial[k]) for k in initial)
    assert json.loads((Path(merged["replay"]) / "manifest.json").read_text())["sharding"] == kind[:5]
