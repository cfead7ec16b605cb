"""benchmarks.eval_throughput runs end to end on a tiny model and writes well-formed JSON."""

import json
import math

from benchmarks import eval_throughput


def test_eval_throughput_tiny(tmp_path):
    labels = ["World", "Sports", "Business"]
    rows = [{"id": f"agnews_{i}", "input": f"Topic? Option: World, Sports, Business.\nnews {i}\nAnswer:",
             "output": labels[i % 3]} for i in range(9)]
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "agnews_T5.json").write_text(json.dumps(rows))
    out = tmp_path / "r.json"
    eval_throughput.main(["--model", "tiny-causal", "--data-dir", str(tmp_path), "--task", "agnews",
                          "--n", "5", "--batch-size", "4", "--repeats", "2",
                          "--label-strategies", "packed,full", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["n"] == 5 and data["labels"] == 3 and data["predictions_stable_across_repeats"]
    for name in ("batched", "one_by_one", "label_scoring_packed", "label_scoring_full"):
        assert len(data[name]["walls_s"]) == 2 and data[name]["examples_per_s"] > 0
    assert data["label_scoring_packed"]["valid_label_rate"] == 1.0
    assert data["agreement_batched_vs_one_by_one"] == 1.0
    assert data["agreement_between_label_strategies"] == 1.0
    assert math.isfinite(data["speedup_batched_vs_one_by_one"])


def test_eval_throughput_loads_a_runs_adapter(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from aimm.models import attach_lora, load_model, lora_state_dict

    trained = attach_lora(load_model("tiny-causal"), r=4, alpha=8)
    state = {k: torch.randn_like(v) for k, v in lora_state_dict(trained.model).items()}
    stage = tmp_path / "run" / "stages" / "01_agnews"
    stage.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"lora_r": 4, "lora_alpha": 8}))
    save_file(state, str(stage / "adapter.safetensors"))

    bundle = eval_throughput.with_adapter(load_model("tiny-causal"), stage / "adapter.safetensors")
    loaded = lora_state_dict(bundle.model)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # rank 4 from the run's config
    with pytest.raises(SystemExit, match="no such adapter file"):
        eval_throughput.with_adapter(load_model("tiny-causal"), stage / "missing.safetensors")
