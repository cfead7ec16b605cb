"""``dtype: auto``: bfloat16 only where the hardware has bf16 matrix units (aimm.hardware)."""

import json
import warnings

import pytest

from aimm import hardware
from aimm.config import ConfigError, RunConfig
from aimm.hardware import auto_dtype, cpu_has_fast_bfloat16, slow_bfloat16_warning
from aimm.training.engine import Engine

AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "fma3": True, "avx512_f": False,
             "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}
SAPPHIRE_RAPIDS = {**AVX2_ONLY, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True,
                   "amx_tile": True}
COOPER_LAKE = {**AVX2_ONLY, "avx512_f": True, "avx512_bf16": True}
GRAVITON3 = {"architecture": "arm64", "neon": True, "bf16": True, "sve": True, "sve_bf16": True}
CORTEX_A72 = {"architecture": "arm64", "neon": True}


@pytest.mark.parametrize("caps, fast", [(AVX2_ONLY, False), (SAPPHIRE_RAPIDS, True),
                                        (COOPER_LAKE, True), (GRAVITON3, True),
                                        (CORTEX_A72, False), ({}, False)])
def test_fast_bfloat16_needs_bf16_matrix_units(caps, fast):
    assert cpu_has_fast_bfloat16(caps) is fast
    assert auto_dtype("cpu", capabilities=caps) == ("bfloat16" if fast else "float32")


def test_auto_on_a_gpu_follows_its_bf16_support():
    assert auto_dtype("cuda", cuda_bf16=True) == "bfloat16"
    assert auto_dtype("cuda", cuda_bf16=False, capabilities=SAPPHIRE_RAPIDS) == "float32"


def test_this_machines_capabilities_are_read():
    caps = hardware.cpu_capabilities()
    assert caps.get("architecture"), caps  # torch.cpu.get_capabilities() answered
    assert auto_dtype("cpu") == ("bfloat16" if cpu_has_fast_bfloat16(caps) else "float32")


@pytest.mark.parametrize("resolved", ["bfloat16", "float32"])
def test_a_config_never_holds_auto(monkeypatch, resolved):
    """``auto`` is resolved when the config is built, so config.json, the resume check and a
    study's cells compare the dtype actually used."""
    monkeypatch.setattr("aimm.config.auto_dtype", lambda device: resolved)
    for cfg in (RunConfig(dtype="auto"), RunConfig.from_dict({"dtype": "auto"}),
                RunConfig().replace(dtype="auto")):
        assert cfg.dtype == resolved
        assert json.loads(cfg.to_json())["dtype"] == resolved
    assert RunConfig.from_dict({"dtype": "float32"}).dtype == "float32"  # explicit stays


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ConfigError, match=r"dtype='fp16': choose float32, bfloat16 or auto"):
        RunConfig.from_dict({"dtype": "fp16"})


def test_slow_bfloat16_warning_only_for_bf16_on_a_cpu_without_units():
    line = slow_bfloat16_warning("bfloat16", "cpu", capabilities=AVX2_ONLY)
    assert "float32" in line and "AMX" in line and "\n" not in line
    assert slow_bfloat16_warning("bfloat16", "cpu", capabilities=SAPPHIRE_RAPIDS) is None
    assert slow_bfloat16_warning("float32", "cpu", capabilities=AVX2_ONLY) is None
    assert slow_bfloat16_warning("bfloat16", "cuda", capabilities=AVX2_ONLY) is None


@pytest.mark.parametrize("caps, warned", [(AVX2_ONLY, True), (SAPPHIRE_RAPIDS, False)])
def test_a_bf16_run_on_such_a_cpu_warns_at_once_and_keeps_the_warning(tiny_config, monkeypatch,
                                                                      caps, warned):
    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: caps)
    cfg = tiny_config(dtype="bfloat16", tasks=["sst-2"], max_train=4, max_test=2, device="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_dir = Engine(cfg).run()
    shown = [str(w.message) for w in seen if "bf16 matrix units" in str(w.message)]
    kept = [w for w in json.loads((run_dir / "warnings.json").read_text())
            if "bf16 matrix units" in w]
    assert (len(shown), len(kept)) == ((1, 1) if warned else (0, 0))
    assert json.loads((run_dir / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("preset", ["demo", "study", "catalogue"])
def test_the_cpu_presets_leave_the_dtype_to_the_hardware(preset):
    """A fixed bfloat16 made the demo ~27x slower per step on CPUs without bf16 units."""
    from aimm.reproduce import PRESETS

    assert PRESETS[preset]["extra"]["dtype"] == "auto"


def test_the_notebooks_default_parameters_leave_the_dtype_to_the_hardware():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("notebooks/0*.ipynb")):
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        namespace: dict = {}
        exec("".join(cell["source"]), namespace)  # the parameters cell: plain assignments
        assert namespace["extra"]["dtype"] == "auto", path.name
