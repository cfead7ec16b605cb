"""Adapters in PEFT's own format, and ``aimm export``: a run's stage as a PEFT adapter and as a
merged full model.

Every stage writes ``stages/<k>_<task>/adapter/`` next to ``adapter.safetensors`` (aimm's own key
layout): what ``PeftModel.save_pretrained`` writes (``adapter_config.json``,
``adapter_model.safetensors``, its model card ``README.md``), with ``base_model_name_or_path`` set
to the model the run used (the local folder it was loaded from; the spec for the tiny and random
test models, which are built, not loaded). PEFT, vLLM / TGI LoRA serving and mergekit read it.
Each file is written atomically (:func:`aimm.runs.atomic_write_bytes`).

:func:`export_stage` (``aimm export RUN_DIR [--stage K] OUT``) writes ``OUT/adapter/`` and
``OUT/merged/``: the base model with the adapter merged in (``merge_and_unload``, float32) and the
tokenizer, which ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM.from_pretrained`` load.
What a method trains decides what is written: a method without a PEFT adapter (its class's
``peft_adapter`` False: ``seq_ft``, whose weights are its stage's method state) gets
``OUT/merged/`` only, the trained full model; a prompt-tuning adapter (``progprompt``) gets
``OUT/adapter/`` only (a soft prompt is an input, not a weight update: nothing to merge).

A method that sums several adapters in the forward (IncLoRA, O-LoRA: the earlier tasks' frozen
adapters plus the new one) makes them PEFT's active adapters; ``adapter/`` then has PEFT's
multi-adapter layout (the newest adapter ``default`` at the top, each earlier one in its
subfolder, e.g. ``task_1/``). :func:`load_stage_model` loads and activates them all, so
``OUT/merged/`` is the base plus every adapter; stock ``PeftModel.from_pretrained`` on the top
folder loads the newest adapter only.

For a method whose stage adapter is not the model it evaluated (``Method.adapter_is_model`` False:
continual merging, where the adapter holds only the last task's LoRA) it writes ``OUT/merged/``
only: the base weights (float32) plus the method's ``evaluated_delta`` from the stage's
``method_state`` files, i.e. the model the stage evaluated; with no such state it refuses.

``aimm export`` never overwrites what it did not write: it refuses an OUT inside a run directory,
and an OUT whose ``adapter/`` or ``merged/`` already holds files unless ``OUT/aimm_export.json``
(written last by every export) marks OUT as an earlier export. It checks the stage's adapter
files against the sha256 recorded in ``state.json`` before loading them.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from aimm.models import unwrap
from aimm.util import error_summary
from aimm.runs import RunDirError, atomic_write_bytes, refuse_links

ADAPTER_DIR = "adapter"
AIMM_ADAPTER = "adapter.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# the files a PEFT save writes into an adapter folder (and each subfolder of a multi-adapter one)
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, "adapter_model.bin", "README.md")
MERGED_DIR = "merged"
EXPORT_MARKER = "aimm_export.json"  # OUT/aimm_export.json: what an aimm export wrote there


def base_model_name(spec: str) -> str:
    """What ``base_model_name_or_path`` names for a model spec: its local folder, or the spec."""
    from aimm.models import TINY_SPECS, resolve_model_path

    if spec in TINY_SPECS or spec.startswith("random:"):
        return spec
    return str(resolve_model_path(spec))


def save_adapter(model, folder: str | Path, base_model: str) -> Path:
    """``model.save_pretrained`` (PEFT) of the model's active adapters into ``folder``, every file
    atomically; returns ``folder``. One active adapter (``default``) is the usual single-adapter
    folder; several (a stack summed in the forward, e.g. IncLoRA / O-LoRA) give PEFT's
    multi-adapter layout: ``default`` at the top, each other adapter in its own subfolder."""
    model = unwrap(model)
    folder = Path(folder)
    active = list(model.active_adapters)
    configs = [model.peft_config[name] for name in active]
    previous = [config.base_model_name_or_path for config in configs]
    for config in configs:
        config.base_model_name_or_path = base_model
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # PEFT writes into a scratch folder beside the target (never outside the run dir), whose
        # files are then placed atomically one by one
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
        try:
            # aimm never resizes the vocabulary: no full embedding copy, and no Hub lookup (PEFT's
            # "auto" asks the Hub for the base config whenever it is not a local folder)
            model.save_pretrained(str(tmp), save_embedding_layers=False, selected_adapters=active)
            written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
            for path in written:
                atomic_write_bytes(folder / path, (tmp / path).read_bytes())
                (tmp / path).unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for config, value in zip(configs, previous):
            config.base_model_name_or_path = value
    _remove_stale_peft_files(folder, set(written))
    return folder


def _remove_stale_peft_files(folder: Path, written: set[Path]) -> None:
    """The files of an earlier PEFT save in ``folder`` that this one did not write (e.g. the
    subfolder of an adapter no longer in the stack); any other file is left alone."""
    subfolders = [p for p in folder.iterdir()  # never into a link: it would delete elsewhere
                  if p.is_dir() and not p.is_symlink() and (p / PEFT_CONFIG).is_file()]
    for where in (folder, *subfolders):
        for name in PEFT_FILES:
            old = where / name
            if old.is_file() and old.relative_to(folder) not in written:
                old.unlink()
    for sub in subfolders:
        if not any(sub.iterdir()):
            sub.rmdir()


def stacked_adapters(folder: str | Path) -> list[str]:
    """The names of the extra adapters of a multi-adapter ``folder`` (its subfolders holding an
    ``adapter_config.json``), in natural order (``task_2`` before ``task_10``)."""
    names = [p.name for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file()]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


@torch.no_grad()
def load_adapter(model, folder: str | Path) -> None:
    """Load a PEFT adapter folder's weights into ``model`` (a LoRA-wrapped PeftModel)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / PEFT_WEIGHTS
    if not path.is_file():
        raise RunDirError(f"{path}: adapter weights missing")
    result = set_peft_model_state_dict(unwrap(model), load_file(str(path)))
    missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]  # not other adapters'
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise RunDirError(f"{path}: does not fit this model's LoRA ({len(missing)} tensors missing, "
                          f"{len(result.unexpected_keys)} unexpected, e.g. {bad})")


def stage_number(stage_dir: Path) -> int:
    """The 1-based number ``k`` of a ``stages/<k>_<task>`` folder."""
    return int(stage_dir.name.split("_", 1)[0])


def restore_stage_adapter(model, stage_dir: str | Path) -> None:
    """Resume: the stage's adapter from ``adapter.safetensors`` (checked: shapes, finite), else
    from ``adapter/``; a damaged one raises :class:`RunDirError` naming it and the way out."""
    from aimm.integrity import load_adapter as load_checked
    from aimm.models import load_lora_state_dict, lora_state_dict

    stage_dir = Path(stage_dir)
    if (stage_dir / AIMM_ADAPTER).is_file():
        lora = load_checked(stage_dir / AIMM_ADAPTER, stage_number(stage_dir), lora_state_dict(model))
        load_lora_state_dict(model, lora)
    elif (stage_dir / ADAPTER_DIR / PEFT_WEIGHTS).is_file():
        load_adapter(model, stage_dir / ADAPTER_DIR)
    else:
        raise RunDirError(f"{stage_dir}: adapter of completed stage missing ({AIMM_ADAPTER} and "
                          f"{ADAPTER_DIR}/{PEFT_WEIGHTS}); cannot resume")


def check_stage_files(run_dir: str | Path, stage_dir: Path) -> None:
    """Before export loads a stage: its adapter and method-state files match the sha256 recorded
    in ``state.json`` when the stage was written, and its PEFT adapter folder is readable (an
    older run without sums); else :class:`RunDirError` naming the damaged file and the way out."""
    from aimm.integrity import adapter_problem, restart_hint, sha256_file
    from aimm.runs import RunStore

    store = RunStore(Path(run_dir))
    number = stage_number(stage_dir)
    hint = (f"check the run with `aimm report --verify {run_dir}`, then {restart_hint(number)}")
    prefix = stage_dir.relative_to(store.root).as_posix() + "/"
    for rel, digest in sorted(store.read_state().get("sha256", {}).items()):
        path = store.root / rel
        used = rel.startswith((prefix + "adapter", prefix + "method_state"))  # what export reads
        if used and path.is_file() and sha256_file(path) != digest:
            raise RunDirError(f"{path}: damaged or edited (its sha256 differs from the one recorded "
                              f"when stage {number} was written); {hint}")
    adapter = stage_dir / ADAPTER_DIR
    if not (adapter / PEFT_WEIGHTS).is_file():
        return
    for folder in (adapter, *(adapter / name for name in stacked_adapters(adapter))):
        try:
            config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            config = exc
        if not isinstance(config, dict):
            raise RunDirError(f"{folder / PEFT_CONFIG}: not a PEFT adapter config (a JSON object); "
                              + hint)
        problem = adapter_problem(folder / PEFT_WEIGHTS)
        if problem:
            raise RunDirError(f"{folder / PEFT_WEIGHTS}: adapter of stage {number} is {problem}; "
                              + hint)


def check_export_target(out: str | Path) -> None:
    """``aimm export``'s OUT: not inside a run directory (a folder holding ``config.json`` and
    ``state.json`` or ``stages/``), and ``OUT/adapter`` / ``OUT/merged`` absent or empty unless
    ``OUT/aimm_export.json`` marks OUT as an earlier export; else :class:`RunDirError`."""
    out = Path(out)
    for folder in (out.resolve(), *out.resolve().parents):
        if (folder / "config.json").is_file() and ((folder / "state.json").is_file()
                                                   or (folder / "stages").is_dir()):
            raise RunDirError(f"{out}: lies inside the run directory {folder}, whose files an export "
                              "would overwrite; choose an OUT outside every run directory")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder; choose an empty or new OUT")
    for name in (ADAPTER_DIR, MERGED_DIR, EXPORT_MARKER):  # links there: writes land elsewhere
        if (out / name).is_symlink():
            raise RunDirError(f"{out / name}: is a link; an export writes and deletes files there "
                              "and would reach what it points to; remove the link or choose a new OUT")
        refuse_links(out / name, "the export", "an export writes and deletes files there")
    marker = out / EXPORT_MARKER
    try:
        ours = json.loads(marker.read_text(encoding="utf-8")).get("aimm_export") == 1
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if marker.exists() and not ours:
        raise RunDirError(f"{marker}: exists and was not written by aimm export; choose an empty or "
                          "new OUT, or remove the file")
    for name in (ADAPTER_DIR, MERGED_DIR):
        folder = out / name
        if not ours and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise RunDirError(f"{folder}: exists and holds files that no aimm export wrote "
                              f"({EXPORT_MARKER} missing); choose an empty or new OUT, or remove "
                              f"{folder}")


def stage_dir_of(run_dir: str | Path, stage: int | None = None) -> Path:
    """``stages/<k>_<task>`` of a run: stage ``k`` (1-based), default the last completed one."""
    from aimm.runs import RunStore

    store = RunStore(Path(run_dir))
    if not store.config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (config.json missing)")
    completed = store.read_state()["completed"]
    if not completed:
        raise RunDirError(f"{run_dir}: no completed stage to export yet")
    k = len(completed) if stage is None else stage
    if not 1 <= k <= len(completed):
        raise ValueError(f"--stage {k}: {run_dir} has completed stages 1..{len(completed)}")
    return store.stage_dir(k - 1, completed[k - 1])


def load_stage_model(run_dir: str | Path, stage: int | None = None):
    """The run's base model (float32) with stage ``k``'s adapter: ``(PeftModel, bundle, cfg)``;
    for a method without a PEFT adapter, the plain model with the stage's trained weights."""
    from peft import PeftModel

    from aimm.config import RunConfig
    from aimm.methods import build_method
    from aimm.models import attach_lora, load_model
    from aimm.runs import load_config

    folder = stage_dir_of(run_dir, stage)
    check_stage_files(run_dir, folder)
    cfg = RunConfig.from_dict(load_config(run_dir))
    bundle = load_model(cfg.model, seed=cfg.seed)  # the run's base (tiny models: same seed)
    method = build_method(cfg, source=str(Path(run_dir) / "config.json"))
    if not method.peft_adapter:  # full fine-tuning: the weights are the stage's method state
        method.load_stage_state(_stage_weights(folder), bundle.model)
        model = bundle.model
    elif (folder / ADAPTER_DIR / PEFT_WEIGHTS).is_file():
        try:
            model = PeftModel.from_pretrained(bundle.model, str(folder / ADAPTER_DIR))
            stacked = stacked_adapters(folder / ADAPTER_DIR)
            for name in stacked:  # a stack (IncLoRA, O-LoRA): the model is base + every adapter
                model.load_adapter(str(folder / ADAPTER_DIR / name), adapter_name=name)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as exc:  # checked files PEFT still refuses (e.g. an edited config)
            raise RunDirError(f"{folder / ADAPTER_DIR}: PEFT cannot load the stage's adapter "
                              f"({error_summary(exc)}); check {PEFT_CONFIG} and {PEFT_WEIGHTS} there, "
                              f"or `aimm report --verify {run_dir}`") from None
        if stacked:
            model.base_model.set_adapter([*stacked, "default"])
    else:  # a run from before adapter/ existed: aimm's own layout
        bundle = attach_lora(bundle, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             targets=cfg.lora_targets)
        restore_stage_adapter(bundle.model, folder)
        model = bundle.model
    model.eval()
    return model, bundle, cfg


def _stage_weights(stage_dir: Path) -> dict:
    """A stage's ``method_state`` (a full fine-tune's trained weights); missing: one clear error."""
    from aimm.training.method_state import read_method_state

    state = read_method_state(stage_dir)
    if state is None:
        raise RunDirError(f"{stage_dir}: the stage's trained weights (method_state.json/.safetensors) "
                          "are missing; restore the stage folder")
    return state


def _method(cfg):
    """The run's method with its options (``None``: a method no longer registered)."""
    from aimm.methods import METHODS, build_method

    return build_method(cfg) if cfg.method in METHODS else None


def stage_adapter_is_model(run_dir: str | Path) -> bool:
    """Whether the run's stage adapters are the models it evaluated (``aimm export`` writes them)."""
    from aimm.config import RunConfig
    from aimm.runs import load_config

    method = _method(RunConfig.from_dict(load_config(run_dir)))
    return method is None or method.adapter_is_model


@torch.no_grad()
def with_evaluated_delta(model, method, stage_dir: Path):
    """The base model of ``model`` (a PeftModel, float32) plus ``method.evaluated_delta`` of the
    stage's method state, LoRA layers removed: the model a continual-merging stage evaluated."""
    from aimm.training.method_state import read_method_state

    state = read_method_state(stage_dir)
    delta = method.evaluated_delta(state) if state is not None else None
    if delta is None:
        raise RunDirError(f"{stage_dir}: method {method.name} evaluates a model that is not its stage "
                          "adapter, and the stage holds no method state to rebuild it from; "
                          "aimm export cannot write this stage")
    peft = unwrap(model)
    for name, d in delta.items():
        try:
            layer = peft.get_submodule(name)
        except AttributeError:
            raise RunDirError(f"{stage_dir}: method state names module {name}, which the run's "
                              "model lacks; restore the stage folder") from None
        weight = layer.get_base_layer().weight
        weight += (d.T if getattr(layer, "fan_in_fan_out", False) else d).to(weight)
    return peft.unload()


def export_stage(run_dir: str | Path, out: str | Path, stage: int | None = None) -> dict[str, Path]:
    """``OUT/adapter/`` (PEFT) and ``OUT/merged/`` (full model + tokenizer) of one stage, as the
    method allows (module docstring); returns what was written: ``{"PEFT adapter": OUT/adapter,
    "merged model": OUT/merged}`` or the one of them that applies."""
    out = Path(out)
    check_export_target(out)
    number = stage_number(stage_dir_of(run_dir, stage))
    model, bundle, cfg = load_stage_model(run_dir, number)
    method = _method(cfg)
    written: dict[str, Path] = {}
    peft_config = getattr(model, "active_peft_config", None)
    if method is not None and not method.adapter_is_model:  # continual merging: θ0 + merged ΔW
        model = with_evaluated_delta(model, method, stage_dir_of(run_dir, stage))
    elif peft_config is not None:
        written["PEFT adapter"] = save_adapter(model, out / ADAPTER_DIR, base_model_name(cfg.model))
        if peft_config.is_prompt_learning:
            return _mark_export(out, run_dir, number, written)
        model = model.merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="aimm-merged-") as tmp:
        model.save_pretrained(tmp)
        bundle.tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                atomic_write_bytes(out / MERGED_DIR / path.relative_to(tmp), path.read_bytes())
    written["merged model"] = out / MERGED_DIR
    return _mark_export(out, run_dir, number, written)


def _mark_export(out: Path, run_dir, number: int, written: dict[str, Path]) -> dict[str, Path]:
    """``OUT/aimm_export.json``, written last: OUT is an aimm export (a later one may replace it)."""
    from aimm.runs import atomic_write_json

    atomic_write_json(out / EXPORT_MARKER, {
        "aimm_export": 1, "run_dir": str(Path(run_dir).resolve()), "stage": number,
        "written": sorted(p.name for p in written.values())})
    return written


__all__ = ["EXPORT_MARKER", "base_model_name", "check_export_target", "check_stage_files",
           "export_stage", "load_adapter", "load_stage_model", "restore_stage_adapter",
           "save_adapter", "stacked_adapters", "stage_adapter_is_model", "stage_dir_of",
           "stage_number", "with_evaluated_delta"]
