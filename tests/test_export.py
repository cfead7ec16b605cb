"""Adapters in PEFT's format: every stage's ``adapter/`` loads with stock PEFT and gives aimm's
logits; ``aimm export`` writes a merged model transformers loads; resume reads either file."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from aimm.cli import main
from aimm.training.engine import run
from aimm.runs import load_metrics, load_scores_matrix


def _inputs(tokenizer, seq2seq: bool) -> dict:
    batch = tokenizer(["Classify: a fine film.", "Topic: stocks fell today"], return_tensors="pt",
                      padding=True)
    if seq2seq:
        batch["decoder_input_ids"] = torch.tensor([[0, 5, 9, 11], [0, 7, 3, 2]])
    return dict(batch)


def _aimm_model(run_dir, spec: str, stage_dir):
    """aimm's own model at the end of a stage: the run's LoRA with adapter.safetensors."""
    from aimm.config import RunConfig
    from aimm.export import restore_stage_adapter
    from aimm.models import attach_lora, load_model

    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    bundle = attach_lora(load_model(spec, seed=cfg.seed), r=cfg.lora_r, alpha=cfg.lora_alpha,
                         dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    restore_stage_adapter(bundle.model, stage_dir)
    return bundle.model.eval(), bundle.tokenizer


@pytest.fixture(scope="module", params=["tiny-causal", "tiny-seq2seq"])
def trained(request, tmp_path_factory, tiny_data):
    from aimm.config import RunConfig

    root = tmp_path_factory.mktemp("export-" + request.param)
    cfg = RunConfig.from_dict(dict(
        benchmark="long_sequence", tasks=["sst-2", "agnews"], data_dir=str(tiny_data),
        model=request.param, method="aimmerging", method_options={"initial_interval": 2},
        max_train=16, max_test=4, batch_size=4, lr=5e-3, max_input_len=64, eval_batch_size=8,
        memory_batch_size=4, buffer_fraction=0.25, run_dir=str(root / "run"), progress=False))
    return request.param, run(cfg), cfg


def test_each_stage_adapter_loads_with_stock_peft_and_gives_aimms_logits(trained):
    from peft import PeftModel

    from aimm.models import load_model  # the base model only (tiny models are built, not loaded)

    spec, run_dir, _ = trained
    stage_dirs = sorted((run_dir / "stages").iterdir())
    assert [d.name for d in stage_dirs] == ["01_sst-2", "02_agnews"]
    for stage_dir in stage_dirs:
        folder = stage_dir / "adapter"
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == spec and config["peft_type"] == "LORA"
        assert config["r"] == 8 and config["lora_alpha"] == 32
        ours, tokenizer = _aimm_model(run_dir, spec, stage_dir)
        peft = PeftModel.from_pretrained(load_model(spec, seed=42).model, str(folder)).eval()
        batch = _inputs(tokenizer, ours.config.is_encoder_decoder)
        with torch.no_grad():
            expected, got = ours(**batch).logits, peft(**batch).logits
            base = peft.get_base_model()
            with peft.disable_adapter():
                plain = base(**batch).logits
        assert torch.equal(got, expected)
        assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter did something
    # the two stages hold different adapters
    a, b = (sorted((run_dir / "stages").iterdir())[i] / "adapter" / "adapter_model.safetensors"
            for i in (0, 1))
    assert a.read_bytes() != b.read_bytes()


def test_export_writes_a_merged_model_transformers_loads(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from aimm.models import load_model

    spec, run_dir, _ = trained
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--stage", "1"]) == 0
    out = tmp_path / "out"
    cls = AutoModelForSeq2SeqLM if spec == "tiny-seq2seq" else AutoModelForCausalLM
    merged = cls.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert merged.config.is_encoder_decoder == (spec == "tiny-seq2seq")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(load_model(spec, seed=42).model, str(out / "adapter")).eval()
    stage1 = run_dir / "stages" / "01_sst-2" / "adapter" / "adapter_model.safetensors"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == stage1.read_bytes()
    batch = _inputs(tokenizer, spec == "tiny-seq2seq")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft(**batch).logits, atol=1e-5, rtol=1e-4)
    # default stage: the last one
    assert main(["export", str(run_dir), str(tmp_path / "last")]) == 0
    last = run_dir / "stages" / "02_agnews" / "adapter" / "adapter_model.safetensors"
    assert (tmp_path / "last" / "adapter" / "adapter_model.safetensors").read_bytes() == last.read_bytes()


def test_export_names_a_bad_stage_or_run_dir(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    assert main(["export", str(run_dir), str(tmp_path / "x"), "--stage", "3"]) == 2
    assert "--stage 3: " in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_resume_works_from_either_adapter_file(trained, tmp_path):
    spec, run_dir, cfg = trained
    for keep in ("adapter.safetensors", "adapter"):
        copy = tmp_path / f"keep-{keep}"
        shutil.copytree(run_dir, copy)
        state = json.loads((copy / "state.json").read_text())
        state["completed"], state["stage_steps"] = state["completed"][:1], state["stage_steps"][:1]
        state["scores"] = [r for r in state["scores"] if r["after_task"] == "sst-2"]
        (copy / "state.json").write_text(json.dumps(state))
        shutil.rmtree(copy / "stages" / "02_agnews")
        stage1 = copy / "stages" / "01_sst-2"
        drop = stage1 / ("adapter" if keep == "adapter.safetensors" else "adapter.safetensors")
        shutil.rmtree(drop) if drop.is_dir() else drop.unlink()
        resumed = run(cfg.replace(run_dir=str(copy)))
        assert load_metrics(resumed) == load_metrics(run_dir), keep
        pd.testing.assert_frame_equal(load_scores_matrix(resumed), load_scores_matrix(run_dir))
    bare = tmp_path / "keep-adapter" / "stages" / "01_sst-2"
    shutil.rmtree(bare / "adapter")
    from aimm.export import restore_stage_adapter
    from aimm.runs import RunDirError

    with pytest.raises(RunDirError, match="adapter of completed stage missing"):
        restore_stage_adapter(None, bare)


# ------------------------------------------------------------------ bad input: one line, exit 2
def _snapshot(folder) -> dict:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _one_line_error(capsys, cmd: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"aimm {cmd}: error: "), err[-5:]
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_export_refuses_an_out_holding_user_files_or_inside_a_run_dir(trained, tmp_path, capsys):
    from aimm.integrity import verify_run

    _, run_dir, _ = trained
    user = tmp_path / "D"
    (user / "adapter" / "notes").mkdir(parents=True)
    (user / "adapter" / "notes" / "todo.txt").write_text("mine")
    (user / "adapter" / "config.yaml").write_text("mine")
    (tmp_path / "M" / "merged").mkdir(parents=True)
    (tmp_path / "M" / "merged" / "config.json").write_text('{"mine": 1}')
    for out, folder in ((user, user / "adapter"), (tmp_path / "M", tmp_path / "M" / "merged")):
        before = _snapshot(out)
        assert main(["export", str(run_dir), str(out)]) == 2
        line = _one_line_error(capsys, "export")
        assert f"{folder}: exists and holds files that no aimm export wrote" in line
        assert "choose an empty or new OUT" in line
        assert _snapshot(out) == before
    # an OUT inside a run dir (here: a stage folder of the run) would overwrite the run's files
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    before = _snapshot(copy)
    for out in (copy / "stages" / "02_agnews", copy, copy / "new"):
        assert main(["export", str(copy), str(out)]) == 2
        assert f"lies inside the run directory {copy}" in _one_line_error(capsys, "export")
    assert _snapshot(copy) == before and verify_run(copy) == []
    # an earlier export (OUT/aimm_export.json) may be replaced; files it did not write stay
    out = tmp_path / "out"
    assert main(["export", str(run_dir), str(out), "--stage", "1"]) == 0
    (out / "adapter" / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), str(out)]) == 0
    assert (out / "adapter" / "notes.txt").read_text() == "mine"
    assert json.loads((out / "aimm_export.json").read_text())["stage"] == 2
    last = run_dir / "stages" / "02_agnews" / "adapter" / "adapter_model.safetensors"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == last.read_bytes()


@pytest.mark.parametrize("where", ["adapter/task_9", "merged", "adapter"])
def test_export_refuses_links_in_an_earlier_export_and_keeps_their_targets(trained, tmp_path,
                                                                           capsys, where):
    """A link planted in an earlier export (whose aimm_export.json anyone can write) used to
    make the export delete the files of an adapter folder it pointed to, or replace a model's
    config.json there."""
    _, run_dir, _ = trained
    out = tmp_path / "out"
    assert main(["export", str(run_dir), str(out), "--stage", "1"]) == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "adapter_config.json").write_text("{}")  # looks like a stale stacked adapter
    (victim / "config.json").write_text("KEEP")
    link = out / where
    if link.exists():
        shutil.rmtree(link)
    link.symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    assert main(["export", str(run_dir), str(out)]) == 2
    line = _one_line_error(capsys, "export")
    assert f"{link}: " in line and "link" in line
    assert _snapshot(victim) == before


def test_save_adapter_removes_only_files_of_an_earlier_peft_save(trained, tmp_path):
    from aimm.export import load_stage_model, save_adapter

    spec, run_dir, _ = trained
    model, _, _ = load_stage_model(run_dir, 1)
    folder = tmp_path / "adapter"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "todo.txt").write_text("mine")
    (folder / "config.yaml").write_text("mine")
    (folder / "task_9").mkdir()  # an adapter of an earlier save's stack: stale
    (folder / "task_9" / "adapter_config.json").write_text("{}")
    (folder / "task_9" / "adapter_model.safetensors").write_bytes(b"old")
    save_adapter(model, folder, spec)
    assert (folder / "notes" / "todo.txt").read_text() == "mine"
    assert (folder / "config.yaml").read_text() == "mine"
    assert not (folder / "task_9").exists()
    assert (folder / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated weights", "mistyped config"])
@pytest.mark.parametrize("recorded", [True, False], ids=["sha256 recorded", "no sha256"])
def test_export_names_a_damaged_stage_adapter_file(trained, tmp_path, capsys, damage, recorded):
    _, run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    adapter = copy / "stages" / "02_agnews" / "adapter"
    if damage == "truncated weights":
        bad = adapter / "adapter_model.safetensors"
        bad.write_bytes(bad.read_bytes()[:-10])
    else:
        bad = adapter / "adapter_config.json"
        bad.write_text(json.dumps({**json.loads(bad.read_text()), "r": "x"}))
    if not recorded:  # a run without sums: the files are still checked before PEFT loads them
        state = json.loads((copy / "state.json").read_text())
        state.pop("sha256", None)
        (copy / "state.json").write_text(json.dumps(state))
    before = _snapshot(copy)
    assert main(["export", str(copy), str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys, "export")
    assert str(bad if recorded or damage == "truncated weights" else adapter) in line, line
    if recorded:
        assert f"aimm report --verify {copy}" in line and "--restart-from-stage 2" in line
    assert not (tmp_path / "out").exists() and _snapshot(copy) == before


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "mistyped config.json",
                                    "pickled pytorch_model.bin"])
def test_run_names_a_damaged_local_model_folder(tiny_data, tmp_path, capsys, damage):
    from aimm.models import load_model

    folder = tmp_path / "model"
    bundle = load_model("tiny-causal", seed=0)
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    marker = tmp_path / "executed"
    if damage == "truncated model.safetensors":
        bad = folder / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[:-10])
    elif damage == "mistyped config.json":
        bad = folder / "config.json"
        bad.write_text(json.dumps({**json.loads(bad.read_text()), "hidden_size": "x"}))
    else:
        import os

        class Plant:  # unpickling it would run os.mkdir(marker)
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        (folder / "model.safetensors").unlink()
        bad = folder / "pytorch_model.bin"
        torch.save({"x": Plant()}, bad)
    before = _snapshot(folder)
    capsys.readouterr()
    run_dir = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--method", "seq_lora", "--benchmark",
                 "long_sequence", "--tasks", "sst-2,agnews", "--data-dir", str(tiny_data),
                 "--max-train", "8", "--max-test", "2", "--batch-size", "4", "--run-dir",
                 str(run_dir), "--no-progress"]) == 2
    line = _one_line_error(capsys, "run")
    assert str(folder) in line and bad.name in line, line
    assert not run_dir.exists() and not marker.exists() and _snapshot(folder) == before
