"""Continual-merging methods (aimm.methods.continual_merging) on the engine and as plug-ins.

The expected merged vectors are recomputed here from each stage's saved LoRA
(``adapter.safetensors``) with the pure functions of :mod:`aimm.merging.continual`, and the
evaluated model is compared with a plain base model whose weights get that ``ΔW``.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from peft.utils import merge_utils as pmu
from safetensors.torch import load_file

from aimm.cli import main
from aimm.config import RunConfig
from aimm.errors import ConfigError
from aimm.merging import continual as cm
from aimm.methods import METHODS, build_method
from aimm.methods.continual_merging import (CONTINUAL_MERGING, ContinualMerging, DareLinear, DareTies,
                                            MagMax, OPCM, Ties, WeightAverage)
from aimm.runs import load_metrics, load_scores_matrix

NAMES = [cls.name for cls in CONTINUAL_MERGING]
SPECS = ["tiny-causal", "tiny-seq2seq"]
SEED = 42  # RunConfig's default seed


# ------------------------------------------------------------------------------ helpers
def vectors(n: int, seed: int = 0, shapes=(("m.q", (6, 5)), ("m.v", (4, 5)))):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g) for k, s in shapes} for _ in range(n)]


def fold_all(method: ContinualMerging, vs: list[dict]) -> list[dict]:
    """The evaluated ΔW after each task vector, as the engine folds them (stage i, seed 42)."""
    return [method.add_task(v, i, SEED) for i, v in enumerate(vs)]


def close(a: dict, b: dict, atol=1e-6) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-5) for k in a)


def inputs(tokenizer, seq2seq: bool) -> dict:
    batch = dict(tokenizer(["Classify: a fine film.", "Topic: stocks fell today"],
                           return_tensors="pt", padding=True))
    if seq2seq:
        batch["decoder_input_ids"] = torch.tensor([[0, 5, 9, 11], [0, 7, 3, 2]])
    return batch


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(**batch).logits.detach().clone()
    model.train(was)
    return out


# ------------------------------------------------------------------------------ options
def test_facts_are_distinct_and_every_method_is_registered():
    assert all(METHODS[n] is cls for n, cls in zip(NAMES, CONTINUAL_MERGING))
    colours = [cls.color for cls in METHODS.values()]
    assert len(set(colours)) == len(colours)
    assert len({cls.display_name for cls in METHODS.values()}) == len(METHODS)
    for cls in CONTINUAL_MERGING:
        assert not cls.adapter_is_model and cls.description and "\n" not in cls.description
    assert all(cls.adapter_is_model for cls in METHODS.values() if cls not in CONTINUAL_MERGING)


def test_defaults_are_the_papers():
    opts = {n: build_method(RunConfig(method=n)).options for n in NAMES}
    assert opts["task_arithmetic"].scaling == 0.3
    assert (opts["ties"].density, opts["ties"].majority_sign_method, opts["ties"].scaling) == (0.2, "total", 1.0)
    assert (opts["dare_linear"].density, opts["dare_linear"].scaling, opts["dare_linear"].seed) == (0.1, 1.0, None)
    assert opts["dare_ties"].majority_sign_method == "total"
    assert opts["magmax"].scaling == 0.5 and opts["opcm"].alpha == 0.5


@pytest.mark.parametrize("method, options, word", [
    ("ties", {"density": 1.5}, "density=1.5"),
    ("ties", {"density": float("nan")}, "density=nan"),
    ("ties", {"majority_sign_method": "mean"}, "majority_sign_method='mean'"),
    ("dare_linear", {"density": 0.0}, "density=0.0"),
    ("dare_ties", {"seed": -1}, "seed=-1"),
    ("dare_ties", {"seed": 1.5}, "seed=1.5"),
    ("task_arithmetic", {"scaling": float("inf")}, "scaling=inf"),
    ("magmax", {"scaling": "big"}, "scaling='big'"),
    ("opcm", {"alpha": 1.2}, "alpha=1.2"),
    ("opcm", {"alhpa": 0.3}, "unknown option 'alhpa'"),
    ("weight_average", {"scaling": 1.0}, "this method has no options"),
])
def test_bad_options_are_one_config_error_line(method, options, word):
    with pytest.raises(ConfigError) as err:
        build_method(RunConfig(method=method, method_options=options))
    assert word in str(err.value) and "\n" not in str(err.value)


def test_a_bad_option_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    assert main(["run", "--method", "ties", "-o", "density=2", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "density=2: must be a number in [0.0, 1.0]" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ plug-in level
def test_ties_folds_with_peft_ties_on_the_same_tensors():
    vs = vectors(3, seed=1)
    method = Ties(Ties.Options(density=0.4, majority_sign_method="frequency", scaling=0.9))
    got = fold_all(method, vs)
    w1, w2 = torch.full((1,), 0.9), torch.full((2,), 0.9)
    want = {k: pmu.ties([vs[0][k]], w1, 0.4, "frequency") for k in vs[0]}
    assert all(torch.equal(got[0][k], want[k]) for k in want)
    for t in (1, 2):
        want = {k: pmu.ties([want[k], vs[t][k]], w2, 0.4, "frequency") for k in vs[0]}
        assert all(torch.equal(got[t][k], want[k]) for k in want)


def test_dare_linear_drops_each_task_once_with_peft_and_sums():
    vs = vectors(2, seed=2)
    got = fold_all(DareLinear(DareLinear.Options(density=0.3, scaling=0.7, seed=5)), vs)
    want = {k: torch.zeros_like(v) for k, v in vs[0].items()}
    for t, v in enumerate(vs):
        with torch.random.fork_rng():
            torch.manual_seed(5 + 1000 * t)  # the option seed, stage t
            want = {k: want[k] + pmu.dare_linear([v[k]], torch.tensor([0.7]), 0.3) for k in v}
        assert close(got[t], want)
    assert not close(got[1], cm.task_arithmetic(vs, 0.7))  # something was dropped


def test_dare_ties_is_peft_drop_then_peft_ties_sign_election():
    vs = vectors(2, seed=3)
    got = fold_all(DareTies(DareTies.Options(density=0.5, scaling=1.0)), vs)  # seed: the run's
    merged = None
    for t, v in enumerate(vs):
        with torch.random.fork_rng():
            torch.manual_seed(SEED + 1000 * t)
            dropped = {k: pmu.prune(v[k], 0.5, "random", rescale=True) for k in v}
        with pytest.warns(UserWarning, match="density 1.0"):
            merged = {k: pmu.ties([dropped[k]] if merged is None else [merged[k], dropped[k]],
                                  torch.ones(1 if merged is None else 2), 1.0, "total") for k in v}
        assert all(torch.equal(got[t][k], merged[k]) for k in v)


def test_magmax_keeps_the_largest_magnitude_entry_scaled():
    a = {"w": torch.tensor([[1.0, -4.0, 0.5], [2.0, 0.0, -3.0]])}
    b = {"w": torch.tensor([[-2.0, 3.0, 0.5], [1.0, -1.0, 3.0]])}
    c = {"w": torch.tensor([[0.0, 0.0, -0.1], [-2.5, 0.5, 0.0]])}
    got = fold_all(MagMax(MagMax.Options(scaling=0.5)), [a, b, c])
    assert torch.equal(got[1]["w"], 0.5 * torch.tensor([[-2.0, -4.0, 0.5], [2.0, -1.0, 3.0]]))
    assert torch.equal(got[2]["w"], 0.5 * torch.tensor([[-2.0, -4.0, 0.5], [-2.5, -1.0, 3.0]]))


def test_opcm_projected_update_is_orthogonal_to_the_stored_subspace():
    vs = vectors(3, seed=4, shapes=(("m.q", (8, 6)), ("m.v", (5, 6))))
    method = OPCM(OPCM.Options(alpha=0.5))
    method.add_task(vs[0], 0, SEED)
    assert method.lam == 1.0
    for t in (1, 2):
        before, lam_before = {k: v.clone() for k, v in method.vector.items()}, method.lam
        method.add_task(vs[t], t, SEED)
        assert len(method.task_norms) == t + 1
        for k, m in before.items():
            update = method.lam * method.vector[k] - lam_before * m  # S - λ_{t-1} M_{t-1} = P(τ_t)
            u, s, vh = torch.linalg.svd(m)
            r = cm.opcm_split_rank(s, 0.5)
            assert torch.allclose(u[:, :r].T @ update @ vh[:r].T, torch.zeros(r, r), atol=1e-4)
            assert abs(float((update * m).sum())) < 1e-4 * float(update.norm() * m.norm())
            assert float(update.norm()) > 0.1  # not trivially zero
        norms = method.task_norms
        assert cm.task_vector_norm(method.vector) == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_weight_average_is_the_running_mean():
    vs = vectors(3, seed=5)
    got = fold_all(WeightAverage(), vs)
    assert close(got[2], {k: sum(v[k] for v in vs) / 3 for k in vs[0]})


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_merged_delta_is_a_float32_term_never_added_into_bf16_weights():
    from aimm.methods.merged_delta import MergedDelta, task_vector, use_merged
    from aimm.models import attach_lora, load_model

    bundle = attach_lora(load_model("tiny-causal", dtype=torch.bfloat16, seed=0), dropout=0.0)
    model = bundle.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    batch = inputs(bundle.tokenizer, False)
    plain = logits(model, batch)
    names = list(task_vector(model))
    delta = MergedDelta()
    delta.attach(model)
    delta.set({n: torch.full_like(task_vector(model)[n], 0.05) for n in names})
    use_merged(model, delta, on=True)
    assert all(d.dtype == torch.float32 for d in delta.delta.values())
    assert not torch.equal(logits(model, batch), plain)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    use_merged(model, delta, on=False)
    assert torch.equal(logits(model, batch), plain)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


# ------------------------------------------------------------------------------ on the engine
def expected_deltas(name: str, run_dir, cfg) -> list[dict]:
    """The evaluated ΔW after each stage, from the saved LoRAs and aimm.merging.continual."""
    taus = [cm.lora_deltas({k: v.float() for k, v in sorted(load_file(str(d / "adapter.safetensors")).items())},
                           cfg.lora_alpha / cfg.lora_r)
            for d in sorted((run_dir / "stages").iterdir())]
    seeds = [cfg.seed + 1000 * t for t in range(len(taus))]
    out, merged, lam, norms = [], None, 1.0, []
    for t, tau in enumerate(taus):
        if name == "task_arithmetic":
            merged = cm.task_arithmetic(taus[: t + 1], 0.3)
        elif name == "weight_average":
            merged = {k: sum(x[k] for x in taus[: t + 1]) / (t + 1) for k in tau}
        elif name == "magmax":  # τ_t: the sequential (cumulative) LoRA of stage t
            merged = {k: 0.5 * v for k, v in cm.magmax(taus[: t + 1]).items()}
        elif name == "ties":
            merged = cm.ties([tau] if merged is None else [merged, tau], 0.2, "total", 1.0)
        elif name == "dare_linear":
            d = cm.dare_linear([tau], 0.1, 1.0, seed=seeds[t])
            merged = d if merged is None else cm.task_arithmetic([merged, d], 1.0)
        elif name == "dare_ties":
            d = cm.dare_linear([tau], 0.1, 1.0, seed=seeds[t])
            merged = cm.ties([d] if merged is None else [merged, d], 1.0, "total", 1.0)
        elif name == "opcm":
            merged, lam, norms = (cm.opcm_init(tau) if merged is None else
                                  cm.opcm_step(merged, tau, prev_lambda=lam, task_norms=norms, alpha=0.5))
        out.append(merged)
    return out


@torch.no_grad()
def base_plus(spec: str, delta: dict, batch) -> torch.Tensor:
    """Logits of the run's base model (float32) with ``delta`` added to its weights."""
    from aimm.models import load_model

    model = load_model(spec, seed=SEED).model
    for name, d in delta.items():
        model.get_submodule(name.removeprefix("base_model.model.")).weight += d
    return logits(model, batch)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """``(method, spec) -> (run_dir, cfg, captured)``: one `aimm run` per pair, cached; captured
    logits of the model at every evaluation and right after every ``on_stage_start``."""
    import aimm.evaluation

    cache: dict = {}

    def get(name: str, spec: str):
        if (name, spec) in cache:
            return cache[name, spec]
        from aimm.models import load_tokenizer, smollm2_tokenizer_dir

        batch = inputs(load_tokenizer(smollm2_tokenizer_dir()), spec == "tiny-seq2seq")
        captured = {"eval": [], "start": []}
        real_eval, real_start = aimm.evaluation.evaluate_task, ContinualMerging.on_stage_start

        def spy_eval(model, *a, **k):
            if len(captured["eval"]) < len(captured["start"]):  # once per stage
                captured["eval"].append(logits(model, batch))
            return real_eval(model, *a, **k)

        def spy_start(self, ctx):
            real_start(self, ctx)
            captured["start"].append(logits(ctx.accelerator.unwrap_model(ctx.model), batch))

        run_dir = tmp_path_factory.mktemp(f"{name}-{spec}") / "run"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(aimm.evaluation, "evaluate_task", spy_eval)
            mp.setattr(ContinualMerging, "on_stage_start", spy_start)
            code = main(["run", "--benchmark", "long_sequence", "--tasks", "sst-2,agnews",
                         "--data-dir", str(tiny_data), "--model", spec, "--method", name,
                         "--max-train", "8", "--max-test", "2", "--batch-size", "4", "--lr", "0.01",
                         "--max-input-len", "64", "--run-dir", str(run_dir), "--no-progress"])
        assert code == 0
        cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        cache[name, spec] = (run_dir, cfg, captured, batch)
        return cache[name, spec]

    return get


@pytest.mark.filterwarnings("ignore:The density 1.0:UserWarning")  # expected_deltas' dare_ties
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", NAMES)
def test_run_evaluates_theta0_plus_the_merged_task_vectors(trained, name, spec):
    run_dir, cfg, captured, batch = trained(name, spec)
    assert load_metrics(run_dir)["complete"]
    expected = expected_deltas(name, run_dir, cfg)
    assert len(captured["eval"]) == len(expected) == 2
    method = build_method(cfg)
    for t, stage_dir in enumerate(sorted((run_dir / "stages").iterdir())):
        from aimm.training.method_state import read_method_state

        assert close(method.evaluated_delta(read_method_state(stage_dir)), expected[t], atol=1e-6)
        torch.testing.assert_close(captured["eval"][t], base_plus(spec, expected[t], batch),
                                   atol=2e-5, rtol=1e-4)
    assert not torch.allclose(captured["eval"][1], captured["eval"][0], atol=1e-4)  # task 2 counted


@pytest.mark.parametrize("name", NAMES)
def test_task_2_trains_from_theta0_or_the_sequential_model_without_the_merged_delta(trained, name):
    spec = "tiny-causal"
    run_dir, cfg, captured, batch = trained(name, spec)
    theta0 = base_plus(spec, {}, batch)
    torch.testing.assert_close(captured["start"][0], theta0, atol=1e-6, rtol=0)
    stage1 = cm.lora_deltas({k: v.float() for k, v in load_file(
        str(run_dir / "stages" / "01_sst-2" / "adapter.safetensors")).items()}, cfg.lora_alpha / cfg.lora_r)
    # MagMax: sequential fine-tuning continues task 1's LoRA; the others: a fresh LoRA from θ0
    want = base_plus(spec, stage1, batch) if name == "magmax" else theta0
    torch.testing.assert_close(captured["start"][1], want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(captured["start"][1], captured["eval"][0], atol=1e-4)  # not θ0 + M_1
    a1, a2 = (load_file(str(d / "adapter.safetensors")) for d in sorted((run_dir / "stages").iterdir()))
    assert not any(torch.equal(a1[k], a2[k]) for k in a1 if "lora_A" in k)  # task 2 trained


def test_magmax_on_the_engine_keeps_the_larger_of_the_two_sequential_task_vectors(trained):
    run_dir, cfg, _, _ = trained("magmax", "tiny-causal")
    taus = [cm.lora_deltas({k: v.float() for k, v in load_file(str(d / "adapter.safetensors")).items()}, 4.0)
            for d in sorted((run_dir / "stages").iterdir())]
    from aimm.training.method_state import read_method_state

    state = read_method_state(run_dir / "stages" / "02_agnews")
    for k, v in state["vector"].items():
        assert torch.equal(v.abs(), torch.maximum(taus[0][k].abs(), taus[1][k].abs()))
        assert bool(((v == taus[0][k]) | (v == taus[1][k])).all())  # an entry of one of them, sign kept


def test_opcm_on_the_engine_projects_task_2_off_the_stored_subspace(trained):
    from aimm.training.method_state import read_method_state

    run_dir, _, _, _ = trained("opcm", "tiny-causal")
    s1, s2 = (read_method_state(d) for d in sorted((run_dir / "stages").iterdir()))
    assert s1["lambda"] == 1.0 and len(s2["task_norms"]) == 2
    for k, m in s1["vector"].items():
        update = s2["lambda"] * s2["vector"][k] - s1["lambda"] * m
        assert abs(float((update * m).sum())) <= 1e-4 * float(update.norm() * m.norm())


def test_export_writes_the_evaluated_model_and_no_adapter(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, cfg, captured, batch = trained("magmax", "tiny-causal")
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    assert "PEFT adapter: none" in capsys.readouterr().out
    assert not (tmp_path / "out" / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), captured["eval"][1], atol=2e-5, rtol=1e-4)
    capsys.readouterr()  # transformers' loading bars
    (run_dir / "stages" / "01_sst-2" / "method_state.json").rename(tmp_path / "moved.json")
    try:
        assert main(["export", str(run_dir), str(tmp_path / "x"), "--stage", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("aimm export: error: ") and "holds no method state" in err[-1]
        assert not any("Traceback" in line for line in err)
    finally:
        (tmp_path / "moved.json").rename(run_dir / "stages" / "01_sst-2" / "method_state.json")


@pytest.mark.parametrize("name", ["dare_ties", "magmax", "opcm"])
def test_resume_after_a_task_equals_the_uninterrupted_run(tiny_config, tmp_path, monkeypatch, name):
    from aimm.training.engine import Engine, run

    small = dict(method=name, max_train=8, max_test=2, lr=1e-2)
    full = run(tiny_config(run_dir=str(tmp_path / "full"), **small))
    original = Engine._evaluate

    def crash_in_second_stage(self, ctx, stage, *a, **k):
        if stage.index == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, stage, *a, **k)

    cfg = tiny_config(run_dir=str(tmp_path / "resumed"), **small)
    monkeypatch.setattr(Engine, "_evaluate", crash_in_second_stage)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Engine, "_evaluate", original)
    assert json.loads((tmp_path / "resumed" / "state.json").read_text())["completed"] == ["sst-2"]
    resumed = run(cfg)
    assert load_metrics(resumed) == load_metrics(full)
    pd.testing.assert_frame_equal(load_scores_matrix(resumed), load_scores_matrix(full))
    for f in ("method_state.safetensors", "method_state.json", "adapter.safetensors"):
        a, b = (r / "stages" / "02_agnews" / f for r in (resumed, full))
        assert a.read_bytes() == b.read_bytes(), f
