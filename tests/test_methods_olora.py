"""IncLoRA and O-LoRA (:mod:`aimm.methods.incremental_lora`, :mod:`aimm.methods.olora`): the frozen
adapter stack, the orthogonality loss, resume, export and the command line, on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from aimm.cli import main
from aimm.config import RunConfig
from aimm.errors import ConfigError
from aimm.methods import METHODS, build_method
from aimm.methods.base import Stage
from aimm.methods.incremental_lora import IncLoRA
from aimm.methods.olora import OLoRA
from aimm.runs import load_metrics, load_scores_matrix, load_trajectory
from aimm.training import engine
from aimm.training.engine import run

TASKS = ["sst-2", "agnews", "rte"]
STAGES = ["01_sst-2", "02_agnews", "03_rte"]


# ------------------------------------------------------------------------------ helpers
def tiny_lora(r: int = 4, seed: int = 0, dtype=torch.float32):
    from aimm.models import attach_lora, load_model

    torch.manual_seed(seed)
    return attach_lora(load_model("tiny-causal", seed=seed, dtype=dtype), r=r, alpha=8, dropout=0.0).model


def fake_ctx(model, index: int, seed: int = 0):
    return SimpleNamespace(model=model, stage=Stage(index, f"t{index}", (f"t{index}",), ()),
                           cfg=SimpleNamespace(seed=seed))


@torch.no_grad()
def pretend_training(model, seed: int) -> None:
    """Move the trainable (new) adapter as training would: random A and non-zero B."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def new_adapter(path) -> dict[str, dict[str, torch.Tensor]]:
    """A stage's adapter.safetensors as module -> {"A", "B"}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        module, rest = key.split(".lora_", 1)
        out.setdefault(module, {})[rest[0]] = value
    return out


def old_adapters(stage_dir) -> list[dict[str, dict[str, torch.Tensor]]]:
    """The frozen adapters a stage saved (method_state), as module -> {"A", "B"} per task."""
    from aimm.training.method_state import read_method_state

    state = read_method_state(stage_dir)
    return [] if state is None else state["old_adapters"]


def orthogonality(run_dir, stage: str) -> float:
    """Σ_modules Σ_old |A_old A_newᵀ|.sum() of a completed stage."""
    new = new_adapter(run_dir / "stages" / stage / "adapter.safetensors")
    return sum(float((old[m]["A"] @ new[m]["A"].T).abs().sum())
               for old in old_adapters(run_dir / "stages" / stage) for m in new)


def l2(path) -> float:
    return sum(float(torch.linalg.vector_norm(v)) for v in load_file(str(path)).values())


def manual_stack_logits(model_spec: str, seed: int, adapters: list, scaling: float, batch) -> torch.Tensor:
    """Logits of the base model with W0 + s Σ_i B_i A_i written into its weights (no PEFT)."""
    from aimm.models import load_model

    base = load_model(model_spec, seed=seed).model.eval()
    modules = dict(base.named_modules())
    with torch.no_grad():
        for adapter in adapters:
            for module, ab in adapter.items():
                name = module.removeprefix("base_model.model.")
                modules[name].weight += scaling * (ab["B"] @ ab["A"])
        return base(**batch).logits


def make_cfg(tiny_data, run_dir, **changes) -> RunConfig:
    values = dict(benchmark="long_sequence", tasks=TASKS, data_dir=str(tiny_data),
                  model="tiny-causal", max_train=16, max_test=4, batch_size=4, epochs=1, lr=1e-2,
                  max_input_len=64, eval_batch_size=8, memory_batch_size=4, buffer_fraction=0.25,
                  run_dir=str(run_dir), progress=False, warmup_steps=0)
    values.update(changes)
    return RunConfig.from_dict(values)


# ------------------------------------------------------------------------------ registry, options
def test_registered_with_their_own_facts():
    assert METHODS["inclora"] is IncLoRA and METHODS["olora"] is OLoRA
    others = {cls.color for name, cls in METHODS.items() if name not in ("inclora", "olora")}
    assert IncLoRA.color != OLoRA.color and not {IncLoRA.color, OLoRA.color} & others
    assert IncLoRA.sequential() and OLoRA.sequential() and not OLoRA.uses_memory
    o = OLoRA.parse_options({})
    assert (o.lambda_1, o.lambda_2) == (0.5, 0.0)  # the release's scripts


@pytest.mark.parametrize("options, match", [
    ({"lambda_1": -0.5}, r"lambda_1=-0\.5: must be a finite number >= 0"),
    ({"lambda_2": float("nan")}, r"lambda_2=nan: must be a finite number"),
    ({"lambda_1": float("inf")}, r"lambda_1=inf"),
    ({"lambda_1": "big"}, r"lambda_1='big'"),
    ({"lambda_2": True}, r"lambda_2=True"),
    ({"lamda_1": 1.0}, r"unknown option 'lamda_1'.*did you mean 'lambda_1'"),
])
def test_bad_options_raise_one_clear_config_error(options, match):
    with pytest.raises(ConfigError, match=match) as info:
        OLoRA.parse_options(options)  # (NaN / inf never get here from a config: it refuses them)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^config: method_options: olora: unknown option"):
        build_method(RunConfig.from_dict(dict(method="olora", method_options={"lamda_1": 1.0})))
    with pytest.raises(ConfigError, match="has no options"):
        build_method(RunConfig.from_dict(dict(method="inclora", method_options={"lambda_1": 1})))


def test_bad_option_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    assert main(["run", "--method", "olora", "-o", "lambda_1=-1", "--model", "tiny-causal",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lambda_1=-1" in err and ">= 0" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ the stack (unit)
def test_a_new_task_freezes_the_old_adapter_bitwise_and_starts_a_fresh_one():
    model, method = tiny_lora(), IncLoRA()
    method.on_stage_start(fake_ctx(model, 0))
    pretend_training(model, 1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rng = torch.get_rng_state()
    method.on_stage_start(fake_ctx(model, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the stage's random stream is untouched
    params = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(params[name.replace(".default.", ".task_1.")], value)  # bit for bit
        assert not params[name.replace(".default.", ".task_1.")].requires_grad
    # the new adapter: PEFT's init (B = 0, A Kaiming) seeded with seed + 1000 * stage
    fresh = {n: p for n, p in params.items() if ".default." in n}
    assert all(float(p.detach().abs().sum()) == 0 for n, p in fresh.items() if "lora_B" in n)
    assert all(not torch.equal(p, trained[n]) for n, p in fresh.items() if "lora_A" in n)
    twin, twin_method = tiny_lora(), IncLoRA()
    twin_method.on_stage_start(fake_ctx(twin, 0))
    pretend_training(twin, 2)
    twin_method.on_stage_start(fake_ctx(twin, 1))
    twin_params = dict(twin.named_parameters())
    assert all(torch.equal(p, twin_params[n]) for n, p in fresh.items() if "lora_A" in n)
    # the inner optimiser gets the new adapter only; the forward sums both
    assert {id(p) for p in method.trainable_parameters(model)} == {id(p) for p in fresh.values()}
    assert list(model.active_adapters) == ["task_1", "default"]


def test_on_a_bf16_base_the_old_adapters_stay_float32_and_the_base_untouched():
    model, method = tiny_lora(dtype=torch.bfloat16), IncLoRA()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    method.on_stage_start(fake_ctx(model, 0))
    pretend_training(model, 1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    method.on_stage_start(fake_ctx(model, 1))
    params = dict(model.named_parameters())
    for name, value in trained.items():
        old = params[name.replace(".default.", ".task_1.")]
        assert old.dtype == torch.float32 and torch.equal(old, value)
    assert all(torch.equal(params[n], v) and v.dtype == torch.bfloat16 for n, v in base.items()
               if v.is_floating_point())


def test_the_forward_is_the_base_plus_every_adapter():
    model, method = tiny_lora(), IncLoRA()
    stacks = []
    for stage in range(3):
        method.on_stage_start(fake_ctx(model, stage))
        pretend_training(model, 10 + stage)
    stacks = [{m: {"A": ab["A"].detach(), "B": ab["B"].detach()} for m, ab in adapter.items()}
              for adapter in method.old_adapters()]
    layers = method.layers
    stacks.append({m: {"A": layer.lora_A["default"].weight.detach(),
                       "B": layer.lora_B["default"].weight.detach()} for m, layer in layers.items()})
    assert len(stacks) == 3 and list(model.active_adapters) == ["task_1", "task_2", "default"]
    model.eval()
    batch = {"input_ids": torch.randint(0, 200, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        got = model(**batch).logits
    scaling = next(iter(layers.values())).scaling["default"]
    want = manual_stack_logits("tiny-causal", 0, stacks, scaling, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and not the newest adapter alone
        single = manual_stack_logits("tiny-causal", 0, stacks[-1:], scaling, batch)
    assert not torch.allclose(single, want, atol=1e-3)


def test_olora_loss_is_the_releases_formula_on_the_model_and_trains_only_the_new_adapter():
    model, method = tiny_lora(), OLoRA(OLoRA.parse_options({"lambda_1": 0.5, "lambda_2": 0.25}))
    method.on_stage_start(fake_ctx(model, 0))
    params = lambda: dict(model.named_parameters())  # noqa: E731
    # first task: no earlier A, only the L2 term
    first = method.extra_loss(None, None)
    l2_hand = sum(torch.norm(p, p=2) for n, p in params().items() if ".default." in n)
    torch.testing.assert_close(first, 0.25 * l2_hand)
    assert OLoRA().extra_loss(None, None) is None  # defaults (λ₂ = 0): nothing to add on task 1
    pretend_training(model, 3)
    method.on_stage_start(fake_ctx(model, 1))
    pretend_training(model, 4)
    method.on_stage_start(fake_ctx(model, 2))
    pretend_training(model, 5)
    # the release's loop (uie_trainer_lora.compute_loss): every old A against the new A of the
    # same module, |A_old A_newᵀ|.sum(); then ‖θ‖₂ of every new A and B
    p = params()
    orth = sum(torch.abs(torch.mm(p[n], p[n.replace(f".{old}.", ".default.")].T)).sum()
               for n in p for old in ("task_1", "task_2") if f"lora_A.{old}." in n)
    l2_new = sum(torch.norm(v, p=2) for n, v in p.items() if ".default." in n)
    loss = method.extra_loss(None, None)
    torch.testing.assert_close(loss, 0.5 * orth + 0.25 * l2_new)
    assert float(orth) > 0
    loss.backward()
    assert all((v.grad is not None) == (".default." in n) for n, v in p.items() if "lora_" in n)


# ------------------------------------------------------------------------------ engine runs
@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """3-task runs on tiny-causal: IncLoRA (the model each evaluation saw recorded) and O-LoRA."""
    import aimm.evaluation

    root = tmp_path_factory.mktemp("olora")
    seen = []
    real = aimm.evaluation.evaluate_task

    def spy(model, *args, **kwargs):
        layer = next(m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
        seen.append({"active": list(model.active_adapters),
                     "task_1_A": layer.lora_A["task_1"].weight.detach().clone()
                     if "task_1" in layer.lora_A else None})
        return real(model, *args, **kwargs)

    aimm.evaluation.evaluate_task = spy
    try:
        inclora = run(make_cfg(tiny_data, root / "inclora", method="inclora"))
    finally:
        aimm.evaluation.evaluate_task = real
    olora = run(make_cfg(tiny_data, root / "olora", method="olora"))
    return SimpleNamespace(inclora=inclora, olora=olora, seen=seen, root=root, data=tiny_data)


def test_old_adapters_do_not_change_during_later_tasks(runs):
    stage = lambda k: runs.inclora / "stages" / STAGES[k]  # noqa: E731
    trained = [new_adapter(stage(k) / "adapter.safetensors") for k in range(3)]
    assert old_adapters(stage(0)) == [] and not (stage(0) / "method_state.json").exists()
    for k in (1, 2):  # stage k+1 keeps the adapters of stages 1..k, bit for bit
        saved = old_adapters(stage(k))
        assert len(saved) == k
        for i, adapter in enumerate(saved):
            assert set(adapter) == set(trained[i])
            assert all(torch.equal(adapter[m][x], trained[i][m][x]) for m in adapter for x in "AB")
    # each task trained its own adapter (a fresh one, not the previous one continued)
    assert all(not torch.equal(trained[2][m]["A"], trained[1][m]["A"]) for m in trained[2])
    # every evaluation used the stack trained so far, the old adapter as stage 1 left it
    assert [s["active"] for s in runs.seen] == [["default"]] * 1 + [["task_1", "default"]] * 2 \
        + [["task_1", "task_2", "default"]] * 3
    module = next(m for m in trained[0] if m.endswith("layers.0.self_attn.q_proj"))
    assert all(torch.equal(s["task_1_A"], trained[0][module]["A"]) for s in runs.seen[1:])


def test_export_writes_the_stack_and_a_merged_model_of_base_plus_every_adapter(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from aimm.models import load_tokenizer, smollm2_tokenizer_dir

    out = tmp_path / "export"
    assert main(["export", str(runs.inclora), str(out), "--stage", "3"]) == 0
    stage_adapter = runs.inclora / "stages" / STAGES[2] / "adapter"
    for folder in (stage_adapter, out / "adapter"):  # PEFT's multi-adapter layout
        assert {p.name for p in folder.iterdir() if p.is_dir()} == {"task_1", "task_2"}
        assert json.loads((folder / "task_2" / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == "tiny-causal"
    cfg = json.loads((runs.inclora / "config.json").read_text())
    stacks = old_adapters(runs.inclora / "stages" / STAGES[2]) \
        + [new_adapter(runs.inclora / "stages" / STAGES[2] / "adapter.safetensors")]
    tok = load_tokenizer(smollm2_tokenizer_dir())
    batch = dict(tok(["Classify: a fine film.", "Topic: stocks fell"], return_tensors="pt", padding=True))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        got = merged(**batch).logits
    want = manual_stack_logits("tiny-causal", cfg["seed"], stacks, cfg["lora_alpha"] / cfg["lora_r"], batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_olora_keeps_the_new_A_near_orthogonal_to_the_old_ones(runs):
    for stage in STAGES[1:]:
        with_loss, without = orthogonality(runs.olora, stage), orthogonality(runs.inclora, stage)
        # measured on CPU: 0.58 and 0.64 of IncLoRA's (which is O-LoRA with λ₁ = 0)
        assert without > 0 and with_loss < 0.75 * without, (stage, with_loss, without)
    steps, _ = load_trajectory(runs.olora)  # the recorded loss includes the penalty
    steps_inc, _ = load_trajectory(runs.inclora)
    first = lambda s, t: float(s[s["task"] == t]["loss"].iloc[0])  # noqa: E731
    assert first(steps, "sst-2") == first(steps_inc, "sst-2")  # task 1: no old A, no penalty
    assert first(steps, "agnews") > first(steps_inc, "agnews")


def test_lambda_2_shrinks_the_new_adapter(tiny_data, tmp_path):
    norms = {}
    for lam in (0.0, 1.0):
        run_dir = run(make_cfg(tiny_data, tmp_path / f"l2-{lam}", method="olora", tasks=["sst-2"],
                               method_options={"lambda_2": lam}))
        norms[lam] = l2(run_dir / "stages" / STAGES[0] / "adapter.safetensors")
    assert norms[1.0] < 0.9 * norms[0.0], norms


def test_resume_after_a_task_equals_the_uninterrupted_run(runs, monkeypatch):
    original = engine.Engine._evaluate

    def crash_in_third_stage(self, ctx, stage, *a, **k):
        if stage.index == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, stage, *a, **k)

    cfg = make_cfg(runs.data, runs.root / "olora-resumed", method="olora")
    monkeypatch.setattr(engine.Engine, "_evaluate", crash_in_third_stage)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(engine.Engine, "_evaluate", original)
    assert json.loads((runs.root / "olora-resumed" / "state.json").read_text())["completed"] == TASKS[:2]
    resumed = run(cfg)
    assert load_metrics(resumed) == load_metrics(runs.olora)
    pd.testing.assert_frame_equal(load_scores_matrix(resumed), load_scores_matrix(runs.olora))
    pd.testing.assert_frame_equal(load_trajectory(resumed)[0], load_trajectory(runs.olora)[0])
    for name in ("adapter.safetensors", "method_state.safetensors", "method_state.json"):
        assert (resumed / "stages" / STAGES[2] / name).read_bytes() == \
            (runs.olora / "stages" / STAGES[2] / name).read_bytes()


# ------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("method", ["inclora", "olora"])
@pytest.mark.parametrize("spec", ["tiny-causal", "tiny-seq2seq"])
def test_aimm_run_completes_with_two_tasks(method, spec, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main(["run", "--method", method, "--model", spec, "--tasks", "sst-2,agnews",
                 "--data-dir", str(tiny_data), "--max-train", "8", "--max-test", "2",
                 "--batch-size", "4", "--max-input-len", "64", "--no-progress",
                 "--run-dir", str(run_dir)]) == 0
    metrics = load_metrics(run_dir)
    assert metrics["complete"] and metrics["method"] == method
    assert (run_dir / "stages" / STAGES[1] / "adapter" / "task_1" / "adapter_model.safetensors").is_file()
    assert len(old_adapters(run_dir / "stages" / STAGES[1])) == 1


def test_stock_peft_loads_the_top_folder_as_the_newest_adapter(runs):
    from peft import PeftModel

    from aimm.models import load_model

    folder = runs.inclora / "stages" / STAGES[1] / "adapter"
    peft = PeftModel.from_pretrained(load_model("tiny-causal", seed=42).model, str(folder))
    newest = new_adapter(runs.inclora / "stages" / STAGES[1] / "adapter.safetensors")
    for name, p in peft.named_parameters():
        if "lora_A" in name:
            module = name.split(".lora_A")[0]
            assert torch.equal(p, newest[module]["A"])
    assert list(peft.active_adapters) == ["default"]
