"""esdwatch.Monitor on sharded weights: FSDP2 (``fully_shard``, DTensor) and FSDP1, 2 CPU processes, gloo.

Lightning's ``"fsdp"`` strategy refuses CPU, so these tests drive :class:`esdwatch.Monitor`
from a plain training loop in 2 processes started by ``torch.multiprocessing.spawn``
(inside a subprocess with a timeout: a collective reached by one rank only fails the
test instead of hanging it). Each rank writes what it saw to ``rank<r>.json``; rank 0
also writes the reference analysis of the unsharded final weights, obtained through
torch's own unsharding (``DTensor.full_tensor()`` / ``summon_full_params``), not through
esdwatch's gather.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from _processes import run_bounded

dist = pytest.importorskip("torch.distributed")

from esdwatch.monitor.distributed import assign_owners, layer_cost  # noqa: E402
from esdwatch.schema import LayerReport  # noqa: E402
from esdwatch.sinks.jsonl import read_distributed, read_records  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

OPTS = dict(min_evals=8, traps=False, on_backpressure="block", every_n_steps=5, at_start=True)
STEPS = 20
METRICS = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "entropy",
    "lambda_max",
    "mp_sigma2",
    "lambda_plus",
    "num_spikes",
    "num_evals",
)
TIMEOUT_S = 240
TEARDOWN_ABORT = "terminate called without an active exception"


def _model() -> nn.Sequential:
    # an odd size (53) gives uneven shards; the conv kernel is a pooled (3, 16, 4) matrix
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(40, 64),
        nn.ReLU(),
        nn.Linear(64, 53),
        nn.ReLU(),
        nn.Linear(53, 36),
        nn.ReLU(),
        nn.Unflatten(1, (4, 9)),
        nn.Conv1d(4, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7, 12),
    )


# ---------------------------------------------------------------------------- subprocess side


def _worker(rank: int, world: int, out: str, kind: str, port: int) -> None:
    import torch.distributed as dist

    from esdwatch.engine.analyzer import analyze_layers
    from esdwatch.engine.layers import find_layers
    from esdwatch.monitor import Monitor
    from esdwatch.monitor.distributed import clean_fsdp_name, gather_to_owner, is_dtensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, (nn.Linear, nn.Conv1d)):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear, nn.Conv1d}),
            device_id=torch.device("cpu"),
            use_orig_params=kind == "fsdp1",
        )  # "fsdp1-flat": use_orig_params=False
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    mon = Monitor(wrapped, rank=rank, world_size=world, log_dir=out, **OPTS)
    mon.start()
    for step in range(1, STEPS + 1):
        x = torch.randn(32, 40, generator=g)
        loss = wrapped(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step)
    mon.close()
    info = {
        "rank": rank,
        "mode": mon.mode,
        "owners": mon.owners,
        "bytes_copied": mon.stats["bytes_copied"],
        "layers_analysed": mon.stats["layers_analysed"],
        "snapshots": mon.snapshots,
    }
    # reference: the unsharded final weights, through torch's own unsharding
    config = mon.config
    if kind == "fsdp2":
        mats = find_layers(wrapped, min_evals=8)[0]
        assert mats and all(is_dtensor(m.weight) for m in mats)
        full = [m.weight.full_tensor() for m in mats]  # all-gather, every rank
        # gather_to_owner: only the owner receives the matrix
        got = [gather_to_owner(m.weight, 1, rank) for m in mats]
        info["gather_to_owner_none_on_non_owner"] = all(t is None for t in got) if rank == 0 else None
        info["gather_to_owner_equal"] = all(torch.equal(a, b) for a, b in zip(got, full)) if rank == 1 else None
        ref = [dataclasses.replace(m, weight=w) for m, w in zip(mats, full)]
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, recurse=True, writeback=False):
            mats = find_layers(wrapped, min_evals=8)[0]
            ref = [dataclasses.replace(m, name=clean_fsdp_name(m.name), weight=m.weight.detach().clone()) for m in mats]
    if rank == 0:
        info["reference"] = [r.to_dict() for r in analyze_layers(ref, config)]
        info["reference_costs"] = {m.name: layer_cost(m) for m in ref}
    Path(out, f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


def _main(kind: str, out: str, port: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, out, kind, port), nprocs=2, join=True)


# ---------------------------------------------------------------------------- test side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(kind: str, tmp_path: Path) -> tuple[dict, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    returncode, out = run_bounded(
        [sys.executable, __file__, kind, str(tmp_path), str(_free_port())],
        env=env,
        timeout_s=TIMEOUT_S,
        what=f"the 2-process {kind} run",
    )
    written = all((tmp_path / f"rank{r}.json").exists() for r in (0, 1))
    if returncode != 0 and written and TEARDOWN_ABORT in out:
        # both ranks finished their work (results are written just before the final barrier)
        # and one then died in gloo's C++ teardown, a torch flake (seen once in ~30 runs)
        # that comes after everything this test checks
        warnings.warn(
            f"{kind}: a rank aborted in gloo teardown after writing its results", RuntimeWarning, stacklevel=2
        )
    else:
        assert returncode == 0, out[-6000:]
    return tuple(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]


def _check(tmp_path: Path, r0: dict, r1: dict, mode: str) -> None:
    reference = [LayerReport.from_dict(d) for d in r0["reference"]]
    names = [r.name for r in reference]
    assert names == ["0", "2", "4", "7", "10"]
    records = read_records(tmp_path / "esdwatch")
    steps = (0, 5, 10, 15, 20)
    raw = [(r.global_step, r.name) for r in read_records(tmp_path / "esdwatch", dedupe=False)]
    assert sorted(raw) == sorted((s, n) for s in steps for n in names) and len(raw) == len(set(raw))
    # rank 0's final records equal the analysis of the unsharded final weights
    final = [r.report for r in records if r.global_step == STEPS]
    assert [r.name for r in final] == names
    for got, want in zip(final, reference):
        assert got.status == want.status == "ok", (got.name, got.status, got.status_detail)
        for m in METRICS:
            a, b = float(getattr(got, m)), float(getattr(want, m))
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (got.name, m, a, b)
    # the layers were split by cost, both ranks did work, and each rank copied only its own matrices
    costs = r0["reference_costs"]
    if mode == "fsdp1":  # dealt unit by unit (one unit unsharded at a time), loads carried over
        loads = [0.0, 0.0]
        expected = {n: assign_owners([costs[n]], 2, loads)[0] for n in names}
    else:  # all matrices known up front: largest first
        expected = dict(zip(names, assign_owners([costs[n] for n in names], 2)))
    assert r0["owners"] == r1["owners"] == expected and set(expected.values()) == {0, 1}
    assert r0["mode"] == r1["mode"] == mode
    lines = read_distributed(tmp_path / "esdwatch")
    assert [d["global_step"] for d in lines] == list(steps) and all(d["owners"] == expected for d in lines)
    numel = {r.name: r.num_slices * r.N * r.M for r in reference}
    for info, rank in ((r0, 0), (r1, 1)):
        mine = [n for n in names if expected[n] == rank]
        assert info["layers_analysed"] == len(steps) * len(mine)
        # float32 weights: the snapshot buffers hold exactly this rank's full matrices, nothing else
        assert info["bytes_copied"] == len(steps) * 4 * sum(numel[n] for n in mine)
        assert info["bytes_copied"] < len(steps) * 4 * sum(numel.values())


def test_fsdp2_dtensor_weights_are_gathered_to_their_owner_only(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    r0, r1 = _spawn("fsdp2", tmp_path)
    _check(tmp_path, r0, r1, "dtensor")
    assert r0["gather_to_owner_none_on_non_owner"] is True and r1["gather_to_owner_equal"] is True


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp1-flat"])
def test_fsdp1_units_are_summoned_one_at_a_time(tmp_path, kind):
    """FSDP1 (``use_orig_params`` True, and False: flat parameters, freed views outside the unit)."""
    pytest.importorskip("torch.distributed.fsdp")
    r0, r1 = _spawn(kind, tmp_path)
    _check(tmp_path, r0, r1, "fsdp1")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]))


def test_the_fsdp1_unit_filter_keeps_recurrent_gate_matrices():
    # the FSDP1 path restricts discovery to one unit's modules with an exclude pattern built from the
    # name suffixes find_layers adds: the recurrent gates (lstm.weight_ih_l0.i ...) must pass it
    import re

    from esdwatch.monitor.distributed import _only

    keep_lstm = _only(["lstm"]).removeprefix("re:")
    names = ["lstm.weight_ih_l0.i", "lstm.weight_hh_l1_reverse.f", "lstm.weight_hr_l0", "lstm", "fc.weight"]
    assert [bool(re.match(keep_lstm, n)) for n in names] == [False, False, False, False, True]
