"""Progressive Prompts (Razdaibiedina et al., ICLR 2023, arXiv 2301.12314), on PEFT's prompt tuning.

A new soft prompt P_k (``prompt_length`` virtual tokens) per task k; the base model and the
earlier prompts stay frozen, and the prompts are concatenated, newest first, before the input::

    stage k:   h = [P_k ; P_{k-1} ; ... ; P_1 ; E(x)]         (E: the frozen word embeddings)
               P_k = argmin_P  L_k(f_θ([P ; P_{k-1} ; ... ; P_1 ; E(x)]))   θ, P_<k fixed

so each task's prompt reuses the earlier ones (forward transfer) and never changes them (no
forgetting of the prompts; the release's ``previous_prompts = concat([new, previous])``).

Why this method and not L2P (Wang et al. 2022, arXiv 2112.08654): L2P selects, per example, the
top-N prompts of a pool by key-query matching on a frozen forward pass of the input. PEFT's
``PromptTuningConfig`` prepends ONE prompt to every input of a batch, so per-example selection
would mean hand-writing the prompt embedding (and an extra frozen forward per batch, with no
[CLS] query on a decoder-only or seq2seq LM). Progressive Prompts is exactly "a longer prompt
per stage", which PEFT's prompt tuning runs unchanged on causal and seq2seq models
(``get_peft_model`` with ``PromptTuningConfig``; forward, ``generate`` and
``save_pretrained`` / ``from_pretrained`` are PEFT's), so it is both feasible and faithful.

How it maps onto PEFT: one ``PromptTuningConfig`` adapter with ``prompt_length x T`` virtual
tokens (T tasks) holds every prompt (row block j = P_{j+1}); at stage k the adapter's token
indices are set to the blocks [P_k, ..., P_1] and its ``num_virtual_tokens`` to their count, so
PEFT prepends exactly those (and pads the attention mask for them). Only the rows of P_k learn:
the other rows' gradients are zeroed before clipping and their values restored after every
step (AdamW's weight decay would move them). The stage folder's ``adapter/`` is therefore a
plain PEFT prompt-tuning adapter of the model after stage k (``PeftModel.from_pretrained``
loads it; ``aimm export`` writes it, and no merged model: a soft prompt is not a weight
update). ``method_state`` keeps all prompts (safetensors) for the resume.

Defaults are the release's T5 settings (``train_t5_cl.py``): ``prompt_length`` 10 tokens per
task, ``lr`` 0.3 and ``weight_decay`` 1e-5 for the prompt (prompt tuning needs a much larger
lr than LoRA; the run's ``lr`` / ``weight_decay`` do not apply to this method, its own options
do, under the engine's warmup/decay schedule), ``init`` ``sample_vocab`` (each prompt token the
embedding of a random vocabulary token, PEFT's ``SAMPLE_VOCAB``; ``random``: PEFT's N(0, 1)).

Differences from the paper: no residual-MLP reparameterisation of the prompt (the paper's
BERT setting; the release's T5 default ``--prefix_MLP None`` has none either); no early stopping
on validation accuracy; the engine's schedule (linear warmup and decay) instead of the release's
constant lr; every seen task is evaluated with all prompts learned so far (the release's
``test_eval_after_every_task``; with task identity at test time, task i would use P_i..P_1 and
its score would never change). PEFT's forward ignores ``position_ids`` for prompt tuning, so
the engine's explicit positions are dropped: on a left-padded decoder-only batch the distance
between the prompt and the text grows with a row's padding (RoPE: text-to-text distances are
unchanged); PEFT's ``generate`` does the same. Label scoring scores each (input, option) pair
whole (:mod:`aimm.evaluation.label_scoring`), without shared-prompt batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aimm.errors import ConfigError, ModelError
from aimm.methods.base import Method
from aimm.models import unwrap

INITS = {"sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}  # option -> PEFT's PromptTuningInit


@dataclass
class ProgPromptOptions:
    prompt_length: int = 10  # virtual tokens per task (release: --prefix_len 10)
    lr: float = 0.3  # the prompt's learning rate (release T5 default)
    weight_decay: float = 1e-5  # release T5 default
    init: str = "sample_vocab"  # sample_vocab | random

    def validate(self) -> None:
        if isinstance(self.prompt_length, bool) or not isinstance(self.prompt_length, int) \
                or self.prompt_length < 1:
            raise ConfigError(f"prompt_length={self.prompt_length!r}: must be an integer >= 1")
        for name, low in (("lr", False), ("weight_decay", True)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= 0 if low else value > 0)
            if not ok:
                raise ConfigError(f"{name}={value!r}: must be a number {'>= 0' if low else '> 0'}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}: choose {' or '.join(INITS)}")


def prompt_order(stage: int, length: int) -> torch.Tensor:
    """Embedding rows of the prompt at stage ``stage`` (0-based): blocks P_k, ..., P_1."""
    return torch.cat([torch.arange(j * length, (j + 1) * length) for j in range(stage, -1, -1)])


class ProgPrompt(Method):
    """A new soft prompt per task, concatenated with the frozen earlier ones; base frozen."""

    name = "progprompt"
    display_name = "ProgPrompt"
    color = "#17BECF"  # cyan
    description = "a new soft prompt per task, prepended to the frozen earlier prompts (base frozen)"
    Options = ProgPromptOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.peft = None
        self.stage = 0
        self.snapshot: torch.Tensor | None = None

    # ---------------------------------------------------------------- model
    def setup_model(self, bundle, cfg):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        from aimm.models import ModelBundle

        tasks = len(cfg.task_names())
        config = PromptTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM if bundle.is_seq2seq else TaskType.CAUSAL_LM,
            num_virtual_tokens=self.options.prompt_length * tasks,
            num_transformer_submodules=1,  # the encoder's input only (seq2seq), as the paper
            prompt_tuning_init=INITS[self.options.init])
        self.peft = get_peft_model(bundle.model, config)
        self._activate(0)
        return ModelBundle(self.peft, bundle.tokenizer, bundle.is_seq2seq, bundle.spec, bundle.path)

    @property
    def weight(self) -> torch.nn.Parameter:
        """Every prompt: (prompt_length x T, hidden) rows, block j = P_{j+1}."""
        return self.peft.prompt_encoder[self.peft.active_adapter].embedding.weight

    def _activate(self, stage: int) -> None:
        """Make PEFT prepend [P_stage+1, ..., P_1] (0-based ``stage``)."""
        order = prompt_order(stage, self.options.prompt_length)
        if len(order) > self.weight.shape[0]:
            raise ModelError(f"progprompt: stage {stage + 1} needs {len(order)} prompt rows, the "
                             f"adapter has {self.weight.shape[0]}")
        self.peft.prompt_tokens[self.peft.active_adapter] = order
        self.peft.peft_config[self.peft.active_adapter].num_virtual_tokens = len(order)
        self.stage = stage

    def _rows(self) -> slice:
        n = self.options.prompt_length
        return slice(self.stage * n, (self.stage + 1) * n)

    def trainable_parameters(self, model):
        o = self.options
        return [{"params": [self.weight], "lr": o.lr, "weight_decay": o.weight_decay}]

    # ---------------------------------------------------------------- hooks
    def on_stage_start(self, ctx) -> None:
        self.peft = unwrap(ctx.model)
        self._activate(ctx.stage.index)
        self.snapshot = self.weight.detach().clone()

    def inner_loss(self, ctx, batch: dict) -> torch.Tensor:
        # PEFT drops position_ids for prompt tuning (with a warning): drop them here instead
        return super().inner_loss(ctx, {k: v for k, v in batch.items() if k != "position_ids"})

    def before_optimizer_step(self, ctx) -> None:
        """Only P_k learns: the frozen prompts' gradients are zeroed before clipping."""
        grad = self.weight.grad
        if grad is not None:
            keep = torch.zeros_like(grad, dtype=torch.bool)
            keep[self._rows()] = True
            grad.masked_fill_(~keep, 0)

    @torch.no_grad()
    def after_optimizer_step(self, ctx) -> None:
        """The frozen prompts back to their values (AdamW's weight decay moves every row)."""
        rows = self._rows()
        current = self.weight[rows].clone()
        self.weight.copy_(self.snapshot)
        self.weight[rows] = current

    # ---------------------------------------------------------------- state
    def stage_state(self) -> dict[str, Any]:
        return {"prompts": self.weight.detach().clone(), "stages_learned": self.stage + 1,
                "prompt_length": self.options.prompt_length}

    @torch.no_grad()
    def load_stage_state(self, state: dict[str, Any], model) -> None:
        self.peft = unwrap(model)
        self._load(state["prompts"], "progprompt stage state")
        self._activate(int(state["stages_learned"]) - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.weight.detach().clone()}

    def load_state_dict(self, state: dict[str, Any], ctx) -> None:
        self._load(state["prompts"], "progprompt checkpoint")

    @torch.no_grad()
    def _load(self, prompts: torch.Tensor, source: str) -> None:
        if tuple(prompts.shape) != tuple(self.weight.shape):
            raise ModelError(f"{source}: prompts of shape {tuple(prompts.shape)}, the model's "
                             f"{tuple(self.weight.shape)} (another prompt_length or task count?)")
        self.weight.copy_(prompts)
