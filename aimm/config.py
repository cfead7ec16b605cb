"""One validated run configuration, from YAML, CLI flags or notebook parameters.

Every field has the release's value as default where the release has one (spec §6), except the
sizes (``max_train``, ``max_test``, ``epochs``, ``max_input_len`` and the batch: ``batch_size`` x
``grad_accum``), which default to what these 2-core CPUs can run; pass the release's values
(1000 / all / 10 / 1024 / 8 x 4, as the ``standard_cl``, ``long_sequence`` and ``superni`` presets
of :mod:`aimm.reproduce` do) for a full reproduction. ``docs/fidelity.md`` lists every behaviour
of the release with its status here.
Method-specific options live in ``method_options`` and are validated by the method itself:
:meth:`RunConfig.validate` checks only the fields below; ``aimm.methods.build_method(cfg)``
checks ``method`` and ``method_options``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimm.attention import ATTENTION_DTYPES
from aimm.errors import ConfigError  # noqa: F401  (re-exported: `from aimm.config import ConfigError`)
from aimm.hardware import CHOICES as DTYPE_CHOICES, auto_dtype
from aimm.names import name_problem
from aimm.typecheck import field_problems, task_entry_name
from aimm.util import did_you_mean, is_int, is_num


#: Largest learning rate: AdamW's first step is up to 10 x lr, which must fit in float32.
MAX_LR = 1e36


#: Largest ``epochs``: the release trains 10; a bound far beyond any real run, so that a typo
#: (``1e308``) is refused instead of planning a task that never ends.
MAX_EPOCHS = 10_000

#: Largest LoRA rank: a rank above a layer's width adds nothing (the largest LMs are 16k wide;
#: the release uses 8), and a typo (``100000000000``) would try to allocate terabytes.
MAX_LORA_R = 16_384

#: Seeds (``seed``, ``buffer_seed``) are 32-bit, the range every generator seeded accepts
#: (NumPy's too).
MAX_SEED = 2**32 - 1


#: Old config names -> their new names (read with a deprecation warning; old run dirs keep them).
RENAMED = {"probe_history": "record_forgetting_signal"}


#: Fields added after runs were written -> the value every older run ran with. A stored
#: ``config.json`` without one reads as having it (an older run resumes, shares and is compared
#: as what it was).
ADDED = {"attention_dtype": "model"}


def with_added_fields(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a stored config) with the fields of :data:`ADDED` it lacks at their old value."""
    missing = {k: v for k, v in ADDED.items() if k not in values}
    return {**values, **missing} if missing else values


def renamed_fields(values: dict[str, Any], *, source: str = "config", warn: bool = False) -> dict[str, Any]:
    """``values`` with the old names of :data:`RENAMED` replaced by the new ones (a stored
    ``config.json`` of an older run reads as today's). Both names at once: ``ConfigError``."""
    if not any(old in values for old in RENAMED):
        return values
    out = dict(values)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: {old} is the old name of {new}; give only {new}")
        if warn:
            import warnings

            warnings.warn(f"{source}: '{old}' is deprecated, read as '{new}'; rename it",
                          FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def yaml_error_line(path: str | Path, exc: Exception) -> str:
    """PyYAML's multi-line error as one line: ``<file>:<line>:<column>: invalid YAML: <problem>``
    (1-based, where PyYAML marks it), with what it was parsing and where that began."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return f"{path}: invalid YAML: {' '.join(str(exc).split())}"
    line = f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {' '.join(problem.split())}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        where = (f" at {start.line + 1}:{start.column + 1}" if start is not None
                 and (start.line, start.column) != (mark.line, mark.column) else "")
        line += f" ({' '.join(context.split())}{where})"
    return line


@dataclass
class RunConfig:
    # what to train on
    benchmark: str = "standard_cl"
    order: int | None = 1
    tasks: list[str | dict[str, Any]] | None = None  # custom order (names or dataset specs): overrides `order`
    data_dir: str | None = None  # default: $AIMM_DATA, ./data/aimm, ../shared/benchmarks/aimm
    max_train: int | None = 64  # per task (release: 1000 = all)
    max_test: int | None = 100  # per task (release: all)
    # what to train
    method: str = "seq_lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "smollm2-135m"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # default by architecture (T5: q, v)
    dtype: str = "float32"  # base-model weights: float32 | bfloat16 | auto (LoRA stays float32)
    attention_dtype: str = "model"  # model | float32: sdpa on float32 copies (bf16 on CPU: faster, aimm.attention)
    # how to train (spec §6)
    epochs: float = 1.0
    lr: float = 3e-4
    batch_size: int = 8  # micro batch
    grad_accum: int = 1  # a size (CPU default); release: 4 (effective 32)
    warmup_steps: int = 50
    max_warmup_fraction: float | None = None  # None: warmup is warmup_steps (release); a share
    #                                           caps it at that share of a task's steps (CPU runs)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_input_len: int = 512  # release: 1024 (T5)
    max_target_len: int = 128
    truncation: str = "release"  # release: right-cut training prompts, none at evaluation |
    #                              middle: keep head + last 8 tokens (the "Answer:" cue), both
    seed: int = 42
    # memory buffer (spec §5)
    buffer_fraction: float = 0.02
    buffer_mode: str = "official"  # official (uncapped) | capped
    buffer_seed: int = 42  # the release's fixed random.seed(42), independent of `seed`
    memory_batch_size: int = 32
    record_forgetting_signal: bool = False  # probe the forgetting signal after every step (observation only)
    # evaluation
    eval_mode: str = "generate"  # generate | label_scoring
    eval_batch_size: int = 16
    release_answer_map: bool = False  # task363: score "pos"/"neg" as "p"/"n" (release OP script)
    # run store
    run_dir: str | None = None  # default runs/<run_id>
    run_id: str | None = None
    checkpoint_every: int = 0  # within-task checkpoints every N optimiser steps (0: off)
    nan_policy: str = "stop"  # stop | skip
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (GPU; warm-up costs a minute or two)
    compile_backend: str = "inductor"  # torch.compile backend ("eager": trace only, for debugging)
    pad_to_multiple_of: int = 0  # pad batch widths to a multiple (0: 64 under compile, else off)
    fused_optimizer: bool = False  # AdamW(fused=True)
    progress: bool = True

    def __post_init__(self) -> None:
        # ``auto`` becomes the dtype this machine computes fast (aimm.hardware), so that a run's
        # config.json, its resume check and a study's cells hold the dtype that was used
        if self.dtype == "auto" and self.device in ("auto", "cpu", "cuda"):
            self.dtype = auto_dtype(self.device)

    # ----------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "RunConfig":
        """Build and validate; unknown names raise with a suggestion; an old name
        (:data:`RENAMED`) is read as its new one with a one-line deprecation warning."""
        values = renamed_fields(values, source=source, warn=True)
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            lines = []
            for key in unknown:
                lines.append(f"{source}: unknown parameter '{key}'" + did_you_mean(key, names))
            raise ConfigError("\n".join(lines))
        cfg = cls(**values)
        cfg.validate(source=source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "RunConfig":
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error_line(path, exc)) from exc
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply to read (lists or "
                              "mappings nested thousands deep)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read YAML config: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of parameter: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "RunConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def sequence_multiple(self) -> int:
        """Batch widths are padded to a multiple of this (1: no extra padding).

        Under ``compile`` the default is 64, so a task compiles a few graphs (one per width
        bucket) instead of one per distinct batch length; the loss is unchanged (the extra
        positions are padding, masked out and unlabelled).
        """
        if self.pad_to_multiple_of:
            return self.pad_to_multiple_of
        return 64 if self.compile else 1

    # ----------------------------------------------------------------------------------
    def validate(self, *, source: str = "config") -> None:
        """Every field against its declared type (from the dataclass annotations: no coercion,
        so ``"false"`` is not a boolean and ``q_proj`` is not a list), finite numbers everywhere
        (``method_options`` included), names that become paths, then the value rules."""
        errors: list[str] = []
        bad: set[str] = set()
        for name, problem in field_problems(
                type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}).items():
            errors.append(f"{source}: {problem}")
            bad.add(name)
        if "tasks" not in bad and isinstance(self.tasks, list):
            for i, entry in enumerate(self.tasks):
                problem = name_problem(task_entry_name(entry), f"tasks[{i}]")
                if problem:
                    errors.append(f"{source}: {problem} (a task name is the stem of its "
                                  "<task>_T5.json file)")
                    bad.add("tasks")
        if "run_id" not in bad and self.run_id is not None and name_problem(self.run_id, "run_id"):
            derived = self.run_dir is not None and Path(self.run_dir).name == self.run_id
            errors.append(f"{source}: " + (
                f"run_dir={self.run_dir!r}: its last folder name becomes the run id and "
                f"{name_problem(self.run_id, 'run_id')}; rename the folder" if derived
                else name_problem(self.run_id, "run_id")))
            bad.add("run_id")

        def need(cond: bool, name: str, problem: str) -> None:
            if name not in bad and not cond:
                errors.append(f"{source}: {name}={getattr(self, name)!r}: {problem}")

        need(not (isinstance(self.run_dir, str) and not self.run_dir.strip()), "run_dir",
             "an empty path; give a folder, or leave it out (null) for runs/<run id>")
        for name in ("batch_size", "grad_accum", "lora_r", "lora_alpha", "memory_batch_size",
                     "eval_batch_size", "max_input_len", "max_target_len"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, name, "must be a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "seed", "pad_to_multiple_of", "buffer_seed"):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, name, "must be a non-negative integer")
        for name in ("max_train", "max_test"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v > 0), name, "must be a positive integer or null (all)")
        need(is_num(self.lr) and self.lr > 0, "lr", "must be a positive number")
        need(not is_num(self.lr) or self.lr <= MAX_LR, "lr",
             f"must be at most {MAX_LR:g} (larger overflow the optimiser's float32 step)")
        need(is_num(self.epochs) and self.epochs > 0, "epochs", "must be a positive number")
        need(not is_num(self.epochs) or self.epochs <= MAX_EPOCHS, "epochs",
             f"must be at most {MAX_EPOCHS} (the release trains 10)")
        need(not is_int(self.lora_r) or self.lora_r <= MAX_LORA_R, "lora_r",
             f"must be at most {MAX_LORA_R} (a rank above a layer's width adds nothing; "
             "the release uses 8)")
        for name in ("seed", "buffer_seed"):
            v = getattr(self, name)
            need(not is_int(v) or v <= MAX_SEED, name, f"must be at most {MAX_SEED} (2**32 - 1)")
        need(is_num(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(is_num(self.buffer_fraction) and 0 < self.buffer_fraction <= 1, "buffer_fraction",
             "must be in (0, 1]")
        need(self.max_warmup_fraction is None
             or (is_num(self.max_warmup_fraction) and 0 <= self.max_warmup_fraction <= 1),
             "max_warmup_fraction", "must be null (off: warmup_steps, the release) or in [0, 1]")
        need(self.truncation in ("release", "middle"), "truncation", "choose release or middle")
        need(isinstance(self.release_answer_map, bool), "release_answer_map", "must be true or false")
        need(self.buffer_mode in ("official", "capped"), "buffer_mode", "choose official or capped")
        need(self.eval_mode in ("generate", "label_scoring"), "eval_mode",
             "choose generate or label_scoring")
        need(self.nan_policy in ("stop", "skip"), "nan_policy", "choose stop or skip")
        need(self.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
        need(self.dtype in DTYPE_CHOICES, "dtype", "choose float32, bfloat16 or auto")
        need(self.attention_dtype in ATTENTION_DTYPES, "attention_dtype", "choose model or float32")
        need(isinstance(self.method_options, dict), "method_options", "must be a mapping")
        need(self.tasks is None or (isinstance(self.tasks, list) and self.tasks
                                    and all(isinstance(t, (str, dict)) for t in self.tasks)),
             "tasks", "must be a non-empty list of task names or dataset specs")
        from aimm.data.custom import parse_task_spec

        for i, spec in enumerate(self.tasks or []):  # i: the entry's place in the whole list
            if not isinstance(spec, dict):
                continue
            try:
                parse_task_spec(spec, f"tasks[{i}]")
            except ValueError as exc:
                errors.extend(f"{source}: {line}" for line in str(exc).splitlines())
        need(self.order is None or is_int(self.order), "order", "must be an integer")
        need(isinstance(self.model, str) and bool(self.model), "model", "must be a model spec")
        need(isinstance(self.compile_backend, str) and bool(self.compile_backend), "compile_backend",
             "must be a torch.compile backend name, e.g. inductor")

        from aimm.data import ORDERS

        if "benchmark" in bad or "method" in bad or "order" in bad:
            pass
        elif self.benchmark not in ORDERS:
            errors.append(f"{source}: benchmark={self.benchmark!r}: unknown; choose one of "
                          f"{', '.join(ORDERS)}")
        elif self.tasks is None and self.order not in ORDERS[self.benchmark]:
            errors.append(f"{source}: order={self.order!r}: benchmark {self.benchmark} has orders "
                          f"{', '.join(map(str, ORDERS[self.benchmark]))}")
        if errors:
            raise ConfigError("\n".join(errors))

    def task_names(self) -> list[str]:
        from aimm.data.orders import task_sequence

        names = [t["name"] if isinstance(t, dict) else t for t in self.tasks or []] or None
        return task_sequence(self.benchmark, self.order, names)

    def task_specs(self) -> dict:
        """The ``tasks`` entries read from local datasets, by name (:mod:`aimm.data.custom`)."""
        from aimm.data.custom import parse_task_spec

        return {s["name"].lower(): parse_task_spec(s) for s in self.tasks or [] if isinstance(s, dict)}
