"""One name for the forgetting signal; old names still read (config, run dirs)."""

from __future__ import annotations

import json

import pytest

from aimm.config import ConfigError, RunConfig
from aimm.runs import load_config, load_trajectory
from aimm.training.engine import run


def test_the_old_config_name_is_read_as_the_new_one_with_a_warning():
    with pytest.warns(FutureWarning, match="'probe_history' is deprecated, read as 'record_forgetting_signal'"):
        cfg = RunConfig.from_dict({"probe_history": True})
    assert cfg.record_forgetting_signal is True and "probe_history" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="probe_history is the old name of record_forgetting_signal"):
        RunConfig.from_dict({"probe_history": True, "record_forgetting_signal": False})


def test_an_old_run_dir_reads_and_resumes_under_the_new_names(tiny_config):
    cfg = tiny_config(method="seq_lora", record_forgetting_signal=True)
    run_dir = run(cfg)
    steps, _ = load_trajectory(run_dir)
    assert steps["forgetting_signal"].notna().sum() > 0 and "history_loss" not in steps
    # what an older version wrote: the old config name and the old steps.csv columns
    config = json.loads((run_dir / "config.json").read_text())
    config["probe_history"] = config.pop("record_forgetting_signal")
    (run_dir / "config.json").write_text(json.dumps(config))
    assert load_config(run_dir)["record_forgetting_signal"] is True
    run(cfg)  # the same settings: resumes (nothing left to do), no "different config" refusal
    path = run_dir / "stages" / "02_agnews" / "steps.csv"
    text = path.read_text()
    path.write_text(text.replace("forgetting_signal", "history_loss", 2))
    old, _ = load_trajectory(run_dir)
    assert list(old.columns) == list(steps.columns)
    assert old["forgetting_signal_release"].equals(steps["forgetting_signal_release"])
