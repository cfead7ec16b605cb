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
