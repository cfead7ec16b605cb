"""Bit-identity check: a tiny-model run of every method against committed golden files.

Each method runs once on ``tiny-causal`` and the synthetic 3-task benchmark (a few seconds each);
the run's ``scores_matrix.csv`` and every stage's ``steps.csv`` and ``merges.csv`` must equal the
copies under ``tests/golden/<case>/`` byte for byte. A refactor that changes any number, column,
column order or merge decision fails here.

None of the compared files holds a wall-clock value (timings live in ``stage.json`` ->
``seconds``, which is not compared), so no column is dropped: the comparison is of the whole
files.

The goldens are this machine's numbers (CPU, torch 2.13.0, one torch thread during the run). A
different CPU instruction set or torch build may differ in the last bits of a float; then
regenerate them on that machine from a commit known to be right, never to make a refactor pass.

Regenerate the goldens ONLY for an intended behaviour change, and say why in the commit message::

    PYTHONPATH=$PWD python -m tests.golden_update            # all cases
    PYTHONPATH=$PWD python -m tests.golden_update aimmerging # some cases
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
TASKS = ["sst-2", "agnews", "rte"]

# case -> RunConfig changes. Merging methods use short intervals so that merges happen; all but
# seq_lora score by label likelihood, because greedy generation of an untrained tiny model scores
# 0.0 everywhere (seq_lora keeps generation covered)
CASES: dict[str, dict] = {
    "seq_lora": dict(method="seq_lora", record_forgetting_signal=True),
    "replay": dict(method="replay", eval_mode="label_scoring"),
    "mtl": dict(method="mtl", eval_mode="label_scoring"),
    "single_task": dict(method="single_task", eval_mode="label_scoring"),
    "aimmerging": dict(method="aimmerging", eval_mode="label_scoring", max_train=24,
                       method_options={"initial_interval": 2, "cold_start": 1,
                                       "threshold_factor": 1.0}),
    "recurrent_kif": dict(method="recurrent_kif", eval_mode="label_scoring",
                          method_options={"interval": 2}),
}


def golden_run(case: str, root: Path) -> Path:
    """Run ``case`` under ``root`` (data and run dir) with one torch thread; its run dir."""
    import torch

    from aimm.config import RunConfig
    from aimm.data.synthetic import make_synthetic_benchmark
    from aimm.training.engine import run

    data = make_synthetic_benchmark(root / "data", n_train=24, n_test=6, seed=0)
    cfg = RunConfig.from_dict(dict(
        benchmark="long_sequence", tasks=TASKS, data_dir=str(data), model="tiny-causal",
        **{"max_train": 16, **CASES[case]}, max_test=4, batch_size=4, epochs=1, lr=1e-3, max_input_len=64,
        eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25, seed=42,
        run_dir=str(root / "run"), progress=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


def compared_files(run_dir: Path) -> list[Path]:
    """The compared files of a run, relative to its run dir."""
    files = [Path("scores_matrix.csv")]
    for stage in sorted((run_dir / "stages").iterdir()):
        files += [stage.relative_to(run_dir) / "steps.csv", stage.relative_to(run_dir) / "merges.csv"]
    return files


def update(cases: list[str], tmp: Path) -> None:
    """Rewrite the goldens of ``cases`` from a fresh run of the current code."""
    for case in cases:
        run_dir = golden_run(case, tmp / case)
        target = GOLDEN / case
        shutil.rmtree(target, ignore_errors=True)
        for rel in compared_files(run_dir):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / rel, target / rel)
        print(f"{case}: {len(compared_files(run_dir))} files -> {target}")


@pytest.mark.parametrize("case", list(CASES))
def test_run_is_bit_identical_to_golden(case, tmp_path):
    run_dir = golden_run(case, tmp_path)
    got = compared_files(run_dir)
    want = sorted(p.relative_to(GOLDEN / case) for p in (GOLDEN / case).rglob("*.csv"))
    assert sorted(got) == want, "stages differ from the golden run"
    for rel in got:
        assert (run_dir / rel).read_bytes() == (GOLDEN / case / rel).read_bytes(), (
            f"{case}: {rel} differs from tests/golden/{case}/{rel}")
    if case in ("aimmerging", "recurrent_kif"):  # the check covers merges only if they happen
        merges = [rel for rel in got if rel.name == "merges.csv"]
        assert sum((run_dir / rel).read_text().count("\n") > 1 for rel in merges) >= 2
