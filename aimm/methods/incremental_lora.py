"""IncLoRA: a new LoRA adapter per task; the earlier tasks' adapters frozen and summed.

The incremental-LoRA baseline of O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning", arXiv 2310.14152, §4 baselines): O-LoRA without its loss.
While task t trains, every adapted linear layer computes

    h = W0 x + s Σ_{i<t} B_i A_i x + s B_t A_t x,        s = lora_alpha / r,

with the earlier (B_i, A_i) frozen and only the new (B_t, A_t) updated. Evaluation after task t
uses the same sum (every adapter trained so far).

How it is kept (PEFT's own multi-adapter LoRA, no custom layer): the adapter being trained is
always PEFT's ``default`` adapter, so the engine's adapter files, checkpoints and NaN checks see
exactly the new adapter. At the start of task t (t >= 2) the previous task's ``default`` is copied
bit for bit into a new frozen PEFT adapter ``task_<t-1>`` (float32, as PEFT keeps LoRA weights
even on a bf16 base; never added into the base weights), ``default`` is re-initialised with
PEFT's default init (A Kaiming-uniform, B = 0) under the stage's seed ``seed + 1000 (t-1)`` (the
engine's stage seed; the first task keeps the adapter the engine seeded with ``seed``, so task 1
equals ``seq_lora``'s), and ``[task_1, ..., task_<t-1>, default]`` are made PEFT's active adapters
(``LoraModel.set_adapter(list)``: a LoRA layer sums its active adapters), the old ones frozen.

Run directory: ``adapter.safetensors`` of stage t holds task t's adapter; its
``method_state.safetensors`` the frozen ones (``old_adapters``, one entry per earlier task;
none after task 1), so a resumed run rebuilds the same stack. ``adapter/`` (PEFT's format) holds
the whole stack in PEFT's multi-adapter layout: the new adapter at the top, each earlier one in
its subfolder ``task_<i>/``; :func:`aimm.export.load_stage_model` and ``aimm export`` load them
all and activate the sum (``OUT/merged/`` = base + every adapter). Stock
``PeftModel.from_pretrained(base, adapter/)`` loads only the top (newest) adapter.

Differences from the O-LoRA release's code (cmnfriend/O-LoRA, ``src/peft/tuners/lora.py``): the
release concatenates the old adapters along the rank (a frozen ``lora_A`` of rank r·(t-1), empty
for the first task, beside the new ``loranew_A``) and applies one dropout mask per layer to the
input of both; here each old adapter is its own PEFT adapter with its own dropout mask (the same
sum with the same scaling α/r each; only the training noise differs, and evaluation has no
dropout). Adapters are added to the model after the engine prepared it: single process or DDP,
not FSDP.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from aimm.errors import RunDirError
from aimm.methods.base import Method
from aimm.models import lora_layers, reset_lora, rng_untouched, unwrap

CURRENT = "default"  # the PEFT adapter being trained (the engine's adapter files hold this one)
OLD = "task_{}"  # the frozen PEFT adapter of task i (1-based, as the stage folders)


def ensure_adapter(model: torch.nn.Module, name: str) -> None:
    """Add PEFT adapter ``name`` (the config of ``default``) unless it exists. PEFT initialises
    it randomly; the global RNG is left as it was, so adding it changes no later random draw."""
    model = unwrap(model)
    if name not in model.peft_config:
        with rng_untouched():
            model.add_adapter(name, copy.deepcopy(model.peft_config[CURRENT]))


def activate(model: torch.nn.Module, n_old: int) -> None:
    """Make ``task_1 .. task_<n_old>`` and ``default`` the active (summed) adapters, the old ones
    frozen (PEFT's ``set_adapter`` makes every active adapter trainable, so they are frozen after)."""
    model = unwrap(model)
    old = [OLD.format(i) for i in range(1, n_old + 1)]
    wanted = [*old, CURRENT]
    if list(model.active_adapters) != wanted:
        model.base_model.set_adapter(wanted)
    if old:
        model.set_requires_grad(old, requires_grad=False)


class IncLoRA(Method):
    """A new LoRA per task; the earlier tasks' adapters frozen and summed into the forward."""

    name = "inclora"
    display_name = "IncLoRA"
    color = "#332288"  # indigo (Tol)
    first_stage_as = "seq_lora"  # the first task's LoRA is the only one

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.n_old = 0  # frozen adapters in the forward (task_1 .. task_<n_old>)
        self.layers: dict[str, torch.nn.Module] = {}

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The new task's adapter (``default``) only, in model order."""
        mine = {id(p) for layer in lora_layers(model).values()
                for p in (*layer.lora_A[CURRENT].parameters(), *layer.lora_B[CURRENT].parameters())}
        return [p for p in model.parameters() if id(p) in mine]

    def on_stage_start(self, ctx) -> None:
        """From the second task on: freeze the previous task's adapter, start a fresh one."""
        model = unwrap(ctx.model)
        self.layers = lora_layers(model)
        stage = ctx.stage.index
        if stage > self.n_old:
            if stage != self.n_old + 1:
                raise RuntimeError(f"{self.name}: stage {stage + 1} starts with {self.n_old} frozen "
                                   f"adapters; expected {stage - 1}")
            self._freeze_current(model, OLD.format(stage))
            self.n_old = stage
            reset_lora(model, ctx.cfg.seed + 1000 * stage, CURRENT)
        activate(model, self.n_old)

    @torch.no_grad()
    def _freeze_current(self, model, name: str) -> None:
        ensure_adapter(model, name)
        for layer in self.layers.values():
            for part in (layer.lora_A, layer.lora_B):
                part[name].weight.copy_(part[CURRENT].weight)

    # ---------------------------------------------------------------- the stack as tensors
    def old_adapters(self) -> list[dict[str, dict[str, torch.Tensor]]]:
        """The frozen adapters in the forward: per task, module -> ``{"A", "B"}`` (live tensors)."""
        return [{m: {"A": layer.lora_A[OLD.format(i)].weight, "B": layer.lora_B[OLD.format(i)].weight}
                 for m, layer in self.layers.items()} for i in range(1, self.n_old + 1)]

    def stage_state(self) -> dict[str, Any] | None:
        if not self.n_old:
            return None
        return {"old_adapters": [{m: {k: t.detach().cpu().clone() for k, t in ab.items()}
                                  for m, ab in adapter.items()} for adapter in self.old_adapters()]}

    @torch.no_grad()
    def load_stage_state(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        old = state.get("old_adapters") if isinstance(state, dict) else None
        if not isinstance(old, list):
            raise RunDirError(f"{self.name}: method state holds no 'old_adapters' list; restart "
                              "from this stage")
        model = unwrap(model)
        self.layers = lora_layers(model)
        for i, saved in enumerate(old, 1):
            name = OLD.format(i)
            ensure_adapter(model, name)
            if not isinstance(saved, dict) or set(saved) != set(self.layers):
                raise RunDirError(f"{self.name}: saved adapter {name} does not cover this model's "
                                  "LoRA layers; restart from this stage")
            for m, layer in self.layers.items():
                for key, part in (("A", layer.lora_A), ("B", layer.lora_B)):
                    weight, value = part[name].weight, saved[m].get(key)
                    if not isinstance(value, torch.Tensor) or value.shape != weight.shape:
                        raise RunDirError(f"{self.name}: saved adapter {name} {m} {key} does not "
                                          f"fit shape {tuple(weight.shape)}; restart from this stage")
                    weight.copy_(value)
        self.n_old = len(old)
        activate(model, self.n_old)
