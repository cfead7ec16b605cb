"""The extension points of :class:`aimm.methods.base.Method`: a toy method using each one works.

Each toy is registered for the test only (``METHODS``) and runs on ``tiny-causal``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aimm.methods import METHODS
from aimm.methods.baselines import SeqLoRA
from aimm.runs import load_trajectory
from aimm.training.engine import Engine, run


def register(monkeypatch, cls):
    monkeypatch.setitem(METHODS, cls.name, cls)


def adapter(run_dir, stage="02_agnews"):
    return load_file(str(run_dir / "stages" / stage / "adapter.safetensors"))


# ------------------------------------------------------------------- (a) extra_loss
class WeightPenalty(SeqLoRA):
    """An L2 penalty on the LoRA weights, added to every inner micro-batch loss."""

    name = "toy_penalty"
    factor = 10.0

    def extra_loss(self, ctx, batch):
        return self.factor * sum(p.pow(2).sum() for p in ctx.lora_params().values())


def test_extra_loss_is_added_before_backward(tiny_config, tmp_path, monkeypatch):
    register(monkeypatch, WeightPenalty)
    plain = run(tiny_config(method="seq_lora", run_dir=str(tmp_path / "plain")))
    penalised = run(tiny_config(method="toy_penalty", run_dir=str(tmp_path / "pen")))
    steps_plain, _ = load_trajectory(plain)
    steps_pen, _ = load_trajectory(penalised)
    # the recorded (optimised) loss includes the penalty ...
    assert steps_pen["loss"].iloc[0] > steps_plain["loss"].iloc[0] + 1.0
    # ... and its gradient shrinks the weights it penalises (without backward through the
    # penalty the adapters would be bit-identical: the penalty does not change the data order)
    norm = lambda sd: float(sum(v.pow(2).sum() for k, v in sd.items() if "lora_A" in k))  # noqa: E731
    assert norm(adapter(penalised)) < norm(adapter(plain)) - 1e-3


# ------------------------------------------------------------------- (b) stage state
class CountingState(SeqLoRA):
    """Keeps across stages a tensor (sum of the LoRA weights at each stage end) and a list."""

    name = "toy_state"
    loaded: list = []

    def __init__(self, options=None):
        super().__init__(options)
        self.seen: list[str] = []
        self.total = torch.zeros(())

    def on_stage_end(self, ctx):
        self.seen.append(ctx.stage.name)
        self.total = self.total + sum(p.detach().double().sum() for p in ctx.lora_params().values())

    def stage_state(self):
        return {"seen": list(self.seen), "total": self.total.clone()}

    def load_stage_state(self, state, model):
        CountingState.loaded.append(state)
        self.seen, self.total = list(state["seen"]), state["total"]


def test_stage_state_is_saved_with_the_stage_and_restored_on_resume(tiny_config, tmp_path,
                                                                     monkeypatch):
    register(monkeypatch, CountingState)
    CountingState.loaded.clear()
    tasks = ["sst-2", "agnews", "rte"]
    full = run(tiny_config(method="toy_state", tasks=tasks, run_dir=str(tmp_path / "full")))
    assert CountingState.loaded == []  # an uninterrupted run keeps it in memory
    original = Engine._evaluate

    def crash_in_third_stage(self, ctx, stage, *a, **k):
        if stage.index == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, stage, *a, **k)

    cfg = tiny_config(method="toy_state", tasks=tasks, run_dir=str(tmp_path / "resumed"))
    monkeypatch.setattr(Engine, "_evaluate", crash_in_third_stage)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Engine, "_evaluate", original)
    resumed = run(cfg)
    assert len(CountingState.loaded) == 1 and CountingState.loaded[0]["seen"] == ["sst-2", "agnews"]
    folder = resumed / "stages" / "03_rte"
    want = json.loads((full / "stages" / "03_rte" / "method_state.json").read_text())
    assert json.loads((folder / "method_state.json").read_text()) == want
    assert want["seen"] == ["sst-2", "agnews", "rte"]
    assert torch.equal(load_file(str(folder / "method_state.safetensors"))["t0"],
                       load_file(str(full / "stages" / "03_rte" / "method_state.safetensors"))["t0"])
    sums = json.loads((resumed / "state.json").read_text())["sha256"]
    assert {"stages/02_agnews/method_state.json", "stages/02_agnews/method_state.safetensors"} <= set(sums)
    assert not (tmp_path / "full" / "stages" / "01_sst-2" / "method_state.pkl").exists()


def test_a_changed_method_state_file_stops_the_resume(tiny_config, tmp_path, monkeypatch):
    from aimm.runs import RunDirError

    register(monkeypatch, CountingState)
    cfg = tiny_config(method="toy_state", tasks=["sst-2", "agnews"], run_dir=str(tmp_path / "r"))
    run_dir = run(cfg)
    (run_dir / "stages" / "01_sst-2" / "method_state.json").write_text('{"seen": [], "total": 0}')
    with pytest.raises(RunDirError, match="method_state.json: sha256 differs"):
        run(cfg, restart_from_stage=2)


# ------------------------------------------------------------------- (c) stage end
class ZeroAtStageEnd(SeqLoRA):
    """Changes the model after training: every LoRA B back to zero (the base model)."""

    name = "toy_zero"

    def on_stage_end(self, ctx):
        with torch.no_grad():
            for name, p in ctx.lora_params().items():
                if "lora_B" in name:
                    p.zero_()


def test_on_stage_end_changes_the_model_before_evaluation(tiny_config, tmp_path, monkeypatch):
    import aimm.evaluation

    real, evaluated = aimm.evaluation.evaluate_task, []

    def spy(model, *args, **kwargs):  # the sum of |LoRA B| of the model being evaluated
        evaluated.append(sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(aimm.evaluation, "evaluate_task", spy)
    register(monkeypatch, ZeroAtStageEnd)
    run(tiny_config(method="seq_lora", run_dir=str(tmp_path / "plain")))
    assert len(evaluated) == 3 and min(evaluated) > 0  # trained: B moved away from zero
    evaluated.clear()
    run_dir = run(tiny_config(method="toy_zero"))
    assert evaluated == [0.0, 0.0, 0.0]  # evaluation saw the model as on_stage_end left it
    assert all(float(v.abs().sum()) == 0 for k, v in adapter(run_dir).items() if "lora_B" in k)


# ------------------------------------------------------------------- (d) model set-up
class SmallRank(SeqLoRA):
    """Another PEFT config: LoRA rank 2 on the attention's query projection only."""

    name = "toy_rank"

    def setup_model(self, bundle, cfg):
        from aimm.models import attach_lora

        return attach_lora(bundle, r=2, alpha=4, dropout=0.0, targets=["q_proj"])


class FullFineTune(SeqLoRA):
    """Trains every weight (and the LoRA, which it keeps for the stage folder)."""

    name = "toy_full"
    changed: list = []

    def setup_model(self, bundle, cfg):
        bundle = super().setup_model(bundle, cfg)
        for p in bundle.model.parameters():
            p.requires_grad_(True)
        return bundle

    def on_stage_start(self, ctx):
        self.before = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if "lora_" not in n}

    def on_stage_end(self, ctx):
        FullFineTune.changed.append(sum(not torch.equal(p.detach(), self.before[n])
                                        for n, p in ctx.model.named_parameters() if n in self.before))


def test_setup_model_picks_the_peft_config(tiny_config, monkeypatch):
    register(monkeypatch, SmallRank)
    sd = adapter(run(tiny_config(method="toy_rank")))
    assert sd and all("q_proj" in k for k in sd)
    assert all(2 in tuple(v.shape) for v in sd.values())


def test_a_method_can_train_all_weights(tiny_config, monkeypatch):
    register(monkeypatch, FullFineTune)
    FullFineTune.changed.clear()
    run(tiny_config(method="toy_full"))
    assert len(FullFineTune.changed) == 2 and min(FullFineTune.changed) > 10


def test_a_resumed_merging_method_keeps_its_state_beside_the_lora_weights():
    """A checkpoint's tensors are read on the CPU; on a GPU run θ_t and recurrent_kif's
    importance EMAs must go to the GPU with the LoRA weights (meta stands in for the GPU)."""
    from types import SimpleNamespace

    from aimm.methods.recurrent_kif import RecurrentKIF

    live = {"a.lora_A": torch.empty(2, 3, device="meta"), "a.lora_B": torch.empty(3, device="meta")}
    ctx = SimpleNamespace(lora_params=lambda: live)
    method = RecurrentKIF()
    method.active = True
    state = {**method.task_state(), "theta_t": {k: torch.ones(v.shape) for k, v in live.items()},
             "outer_opt": None}
    state["ipt_in"] = state["ipt_out"] = {k: torch.zeros(v.shape) for k, v in live.items()}
    state["last_merge"] = 3
    method.load_state_dict(state, ctx)
    for tensors in (method.theta_t, method.ipt_in, method.ipt_out):
        assert {k: v.device.type for k, v in tensors.items()} == {k: "meta" for k in live}
    assert method.last_merge == 3
