"""Scale-out stays the same algorithm: 1 process vs 2 (DDP, FSDP2 full shard) on the CPU.

One ``accelerate launch --multi_gpu --num_processes 2`` (gloo) runs ``scaleout_worker.py``: the
engine under DDP and under FSDP2 ``fully_shard`` for aimmerging and recurrent_kif, and the
reduction helper on simulated shards. The one-process references run here. Same global batch
(the engine splits every micro-batch over the ranks), same seed, LoRA dropout 0 (dropout masks
cannot match across a different number of processes).

Tolerances: merge steps, kinds and intervals must be equal; Λ within 1e-5 relative, final LoRA
weights within 1e-6 absolute (weights are ~0.2). Not bit-exact because float32 addition is not
associative: DDP/FSDP sum the two half-batch gradients in an all-reduce / reduce-scatter where one
process backpropagates the whole batch, and a sharded Λ adds per-shard partial sums; the
differences measured are ~1e-7 (README, "Scale-out").
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aimm.errors import ConfigError
from aimm.merging import fusion, reduce

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaleout_worker as worker  # noqa: E402
from conftest import launch_failure, launch_two_processes  # noqa: E402

WORKER = Path(worker.__file__)


@pytest.fixture(scope="module")
def launched(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scaleout")
    result = launch_two_processes(str(WORKER), str(tiny_data), str(out))
    assert result.returncode == 0, launch_failure(result.stderr)
    return out


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    from aimm.engine import run

    out = tmp_path_factory.mktemp("one")
    for method in worker.METHODS:
        run(worker.run_config(method, tiny_data, out / f"one-{method}"))
    return out


def _last_stage(run_dir: Path, name: str) -> Path:
    return sorted((run_dir / "stages").glob(f"*/{name}"))[-1]


def _rows(run_dir: Path, name: str) -> list[dict]:
    with open(_last_stage(run_dir, name), newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------- single process, pure parts
def test_single_process_reductions_are_the_plain_local_ones():
    gen = torch.Generator().manual_seed(0)
    d = {"a": torch.randn(7, 3, generator=gen), "b": torch.randn(11, generator=gen)}
    with reduce.layout(True):  # declared sharded, but no process group: nothing to reduce over
        assert not reduce.is_sharded()
        norms = torch._foreach_norm(list(d.values()), 1, dtype=torch.float32)
        assert fusion.l1_norm(d) == torch.stack(norms).to(torch.float64).sum().item()
        flat = torch.cat([v.reshape(-1) for v in d.values()])
        assert torch.equal(reduce.quantile(list(d.values()), 0.8), torch.quantile(flat, 0.8))
        masks = fusion.top_mask(d, 0.2)
        assert torch.equal(masks["b"], d["b"] > torch.quantile(flat, 0.8))
    assert reduce.l1_norm([]) == 0.0


def test_layout_follows_the_accelerator():
    from accelerate.utils import DistributedType

    def acc(kind, stage=None):
        return SimpleNamespace(distributed_type=DistributedType[kind],
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    assert reduce.layout_for(acc("FSDP")) is True
    assert reduce.layout_for(acc("MULTI_GPU")) is False  # DDP: replicated, never all-reduced
    assert reduce.layout_for(acc("MULTI_CPU")) is False
    assert reduce.layout_for(acc("NO")) is False
    assert reduce.layout_for(acc("DEEPSPEED", 2)) is False
    assert reduce.layout_for(acc("DEEPSPEED", 3), merges=False) is False
    with pytest.raises(ConfigError, match="ZeRO-3"):
        reduce.layout_for(acc("DEEPSPEED", 3))
    with pytest.raises(TypeError):
        reduce.set_layout("yes")


def test_rank_share_gives_the_one_process_token_mean():
    from aimm.training.loop import rank_share

    targets = [[1], [1, 2, 3, 4, 5], [1, 2], [1]]  # tokens per example: 1, 5, 2, 1
    micro = [0, 1, 2, 3]
    per_token = torch.arange(9, dtype=torch.float64)  # a loss value per target token
    starts = [0, 1, 6, 8]
    rows = [per_token[starts[i]: starts[i] + len(targets[i])] for i in micro]
    whole = torch.cat(rows).mean()
    halves = [micro[r::2] for r in range(2)]
    means = [torch.cat([rows[i] for i in h]).mean() for h in halves]
    assert not torch.isclose(sum(means) / 2, whole)  # the plain DDP average is not the token mean
    scaled = [m * rank_share(targets, micro, h, 2) for m, h in zip(means, halves)]
    assert torch.isclose(sum(scaled) / 2, whole, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- two processes
def test_reduction_helper_on_simulated_shards_equals_the_full_tensors(launched):
    per_rank = json.loads((launched / "shards.json").read_text())
    gen = torch.Generator().manual_seed(7)  # the worker's tensors
    full = {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate((96, 5, 64, 3, 128))}
    full["t1"][:] = full["t0"][:5]
    flat = torch.cat([v.reshape(-1) for v in full.values()])
    l1 = fusion.l1_norm(full)
    want_masks = fusion.top_mask({k: v.abs() for k, v in full.items()}, 0.2)
    for uneven in (False, True):
        key = f"uneven={uneven}"
        for rank, res in enumerate(per_rank):
            r = res[key]
            assert r["l1"] == pytest.approx(l1, rel=1e-6, abs=0)  # partial sums: float order only
            assert r["q80"] == torch.quantile(flat, 0.8).item()  # exact: same multiset of values
            assert r["q37"] == torch.quantile(flat, 0.37).item()
            # rank 0's parts of every tensor, then rank 1's: the full multiset of values
            order = [worker.shard_of(v, q, 2, uneven) for q in range(2) for v in full.values()]
            assert r["gathered"] == torch.cat(order).tolist()
            for k, mask in r["mask"].items():
                assert mask == worker.shard_of(want_masks[k], rank, 2, uneven).tolist(), (key, k)
    for res in per_rank:  # DDP: replicated tensors are not summed over ranks
        assert res["replicated_l1"] == l1
        assert res["replicated_as_if_sharded_l1"] == pytest.approx(2 * l1, rel=1e-12)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", list(worker.METHODS))
def test_two_processes_make_the_same_merges_and_weights(launched, reference, strategy, method):
    from safetensors.torch import load_file

    one, two = reference / f"one-{method}", launched / f"{strategy}-{method}"
    stages = sorted((two / "stages").glob("*/stage.json"))
    assert len(stages) == 2  # both stages, each really on 2 ranks (not 2 one-process copies)
    assert all(json.loads(stage.read_text())["processes"] == 2 for stage in stages), stages
    m1, m2 = _rows(one, "merges.csv"), _rows(two, "merges.csv")
    assert len(m1) >= 3
    same = ("step", "kind", "interval_before", "interval_after", "outer_steps")
    assert [[r[k] for k in same] for r in m2] == [[r[k] for k in same] for r in m1]
    for a, b in zip(m1, m2):
        for key in ("l1", "lambda"):  # Λ = l1 / interval (AIMMerging), l1 (Recurrent-KIF)
            if key in a:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), (key, a["step"])
        for share in ("mask_in_share", "mask_out_share"):
            if share in a:
                assert abs(float(a[share]) - float(b[share])) <= 0.005
    s1, s2 = _rows(one, "steps.csv"), _rows(two, "steps.csv")
    assert [r["step"] for r in s2] == [r["step"] for r in s1]
    for a, b in zip(s1, s2):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    w1 = load_file(str(_last_stage(one, "adapter.safetensors")))
    w2 = load_file(str(_last_stage(two, "adapter.safetensors")))
    assert set(w1) == set(w2)
    moved = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved <= 1e-6, f"max |weight difference| {moved}"
