"""Worker of ``tests/test_scaleout.py``: runs under ``accelerate launch --multi_gpu --num_processes 2``
(two gloo CPU processes). Usage: ``scaleout_worker.py DATA_DIR OUT_DIR``. It writes, under OUT_DIR:

* ``ddp-<method>/``: the engine as it is (accelerate on CPU = DDP, replicated LoRA tensors);
* ``fsdp-<method>/``: the same engine loop with the model sharded by FSDP2 ``fully_shard`` on a
  CPU device mesh (accelerate 1.15 runs FSDP only on accelerators and FSDP1 refuses the CPU, see
  README "Scale-out"), the reduction layout ``sharded``, and rank-0 evaluation replaced by saving
  the gathered full LoRA tensors (the engine's evaluation assumes replicated weights);
* ``shards.json``: the reduction helper on simulated shards (each rank a part of every tensor).

Also imported by the test for the shared run configs (:func:`run_config`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

METHODS = {"aimmerging": {"initial_interval": 2, "min_interval": 1, "cold_start": 1,
                          "threshold_factor": 1.0},
           "recurrent_kif": {"interval": 2}}


def run_config(method: str, data_dir, run_dir):
    from aimm.config import RunConfig

    return RunConfig.from_dict(dict(
        benchmark="long_sequence", tasks=["sst-2", "rte"], data_dir=str(data_dir),
        model="tiny-causal", method=method, method_options=METHODS[method], max_train=24,
        max_test=2, batch_size=4, epochs=2, lr=3e-3, warmup_steps=0, max_input_len=64,
        eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25, lora_dropout=0.0,
        run_dir=str(run_dir), progress=False))


def shard_of(t: torch.Tensor, rank: int, world: int, uneven: bool) -> torch.Tensor:
    """Rank's part of ``t`` flattened: halves, or (uneven) 3/4 vs 1/4 and some parts empty."""
    flat = t.reshape(-1)
    if not uneven:
        return flat.tensor_split(world)[rank]
    cut = (3 * flat.numel()) // 4 if flat.numel() > 4 else flat.numel()
    return flat[:cut] if rank == 0 else flat[cut:]


def simulated_shards(out: Path, rank: int, world: int) -> None:
    from aimm.merging import fusion, reduce

    gen = torch.Generator().manual_seed(7)
    full = {f"t{i}": torch.randn(n, generator=gen) for i, n in enumerate((96, 5, 64, 3, 128))}
    full["t1"][:] = full["t0"][:5]  # ties across tensors and shards
    result = {}
    for uneven in (False, True):
        part = {k: shard_of(v, rank, world, uneven) for k, v in full.items()}
        with reduce.layout(True):
            masks = fusion.top_mask({k: v.abs() for k, v in part.items()}, 0.2)
            local_mask = {k: m.tolist() for k, m in masks.items()}
            result[f"uneven={uneven}"] = {
                "l1": fusion.l1_norm(part),
                "q80": float(reduce.quantile(list(part.values()), 0.8)),
                "q37": float(reduce.quantile(list(part.values()), 0.37)),
                "gathered": [float(x) for x in reduce.gather_flat(list(part.values()))],
                "mask": local_mask,
            }
    # replicated (DDP): the same full tensors on every rank; summing them over ranks would
    # count every parameter twice, which is what the layout prevents
    result["replicated_l1"] = fusion.l1_norm(full)
    result["replicated_as_if_sharded_l1"] = reduce.l1_norm(list(full.values()), sharded=True)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        (out / "shards.json").write_text(json.dumps(gathered))


def fsdp2_patches() -> None:
    """Shard the model with FSDP2 inside the unchanged engine loop (see module docstring)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import aimm.training.engine as engine
    from aimm.training import artifacts
    from aimm.merging import reduce
    from aimm.models import lora_parameters
    from aimm.runs import atomic_write_csv, atomic_write_json

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    full: dict = {}

    def prepare_model(self, model, *args, **kwargs):
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def gather_full(model, accelerator):  # every rank: all-gather the LoRA shards
        params = lora_parameters(model)
        assert all(type(p).__name__ == "DTensor" for p in params.values()), "not sharded"
        full.clear()
        full.update({k: p.detach().full_tensor().clone() for k, p in params.items()})
        return [0.0] * accelerator.num_processes

    def evaluate(self, ctx, stage, data):  # rank 0: save what the test compares
        stage_dir = self.store.stage_dir(stage.index, stage.name)
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_file(full, str(stage_dir / "adapter.safetensors"))
        atomic_write_csv(stage_dir / "steps.csv", ctx.steps)
        atomic_write_csv(stage_dir / "merges.csv", ctx.merges)
        atomic_write_json(stage_dir / "stage.json", {"processes": ctx.accelerator.num_processes})
        return []

    Accelerator.prepare_model = prepare_model
    reduce.layout_for = lambda accelerator, merges=True: True  # accelerate's FSDP -> sharded
    engine.lora_checksums = gather_full
    engine.Engine._evaluate = evaluate
    artifacts.write_results = lambda *args, **kwargs: None


def main(data_dir: str, out: str) -> None:
    from accelerate import PartialState

    from aimm.engine import run

    # the gloo process group, with the engine's own setting: a bare PartialState() here would
    # leave the engine's Accelerator(cpu=True) with one process on each rank (no DDP at all)
    PartialState(cpu=True)
    out_dir = Path(out)
    for method in METHODS:
        run(run_config(method, data_dir, out_dir / f"ddp-{method}"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    simulated_shards(out_dir, rank, world)
    fsdp2_patches()
    for method in METHODS:
        run(run_config(method, data_dir, out_dir / f"fsdp-{method}"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
