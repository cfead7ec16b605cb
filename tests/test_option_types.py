"""Bad input refused in one line: method option types, upper bounds, YAML syntax errors.

* ``method_options`` values are checked against their ``Options`` field annotations as strictly
  as RunConfig fields (``-o fast=False`` is text, not a boolean; ``True`` is not an integer).
* ``epochs``, ``lora_r``, ``seed`` / ``buffer_seed`` and one task's planned example passes have
  stated upper bounds (a typo is refused instead of hanging or allocating terabytes).
* A YAML syntax error is one line: ``<file>:<line>:<column>: invalid YAML: <problem>``.
"""

from __future__ import annotations

import dataclasses

import pytest

from aimm.cli import main
from aimm.config import ConfigError, RunConfig
from aimm.methods import METHODS, build_method
from aimm.schedule import plan_micro_batches, plan_optimizer_steps

# the stated limits (aimm.config.MAX_EPOCHS, MAX_LORA_R, MAX_SEED; aimm.schedule.MAX_EXAMPLE_PASSES),
# written out so that this file also runs (and fails) against a tree without them
MAX_EPOCHS, MAX_LORA_R, MAX_SEED, MAX_EXAMPLE_PASSES = 10_000, 16_384, 2**32 - 1, 10**8


def _error_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _run_args(tmp_path, *extra: str) -> list[str]:
    # the config is refused before any data or model is read: no benchmark needed
    return ["run", "--model", "tiny-causal", "--method", "aimmerging", "--benchmark",
            "long_sequence", "--tasks", "sst-2,agnews,rte", "--data-dir", str(tmp_path / "none"),
            "--run-dir", str(tmp_path / "run"), "--no-progress", *extra]


# ------------------------------------------------------------------ method option types
@pytest.mark.parametrize("option, expected", [
    ("fast=False", "aimmerging: option fast='False': must be true or false, not a string"),
    ("fast=True", "aimmerging: option fast='True': must be true or false, not a string"),
    ("fast=yes", "aimmerging: option fast='yes': must be true or false, not a string"),
    ("fast=1", "aimmerging: option fast=1: must be true or false, not an integer"),
    ("outer_lr=true", "aimmerging: option outer_lr=True: must be a number, not a boolean"),
    ("outer_lr=[1]", "aimmerging: option outer_lr=[1]: must be a number, not a list"),
    ("probe_every=true", "aimmerging: option probe_every=True: must be an integer, not a boolean"),
    ("probe_every=2.5", "option probe_every=2.5: must be an integer, not a number"),
    ("probe_batch_size=\"4\"", "option probe_batch_size='4': must be an integer or null"),
    ("outer_optimizer=1", "option outer_optimizer=1: must be a string, not an integer"),
    ("controller=[1]", "option controller=[1]: must be a mapping"),
])
def test_cli_option_of_wrong_type_is_one_line(capsys, tmp_path, option, expected):
    line = _error_line(capsys, _run_args(tmp_path, "-o", option))
    assert line.startswith("aimm run: error: command line: method_options: ")
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_cli_capitalised_false_says_how_to_write_it(capsys, tmp_path):
    line = _error_line(capsys, _run_args(tmp_path, "-o", "fast=False"))
    assert line.endswith("(write true or false: lowercase, without quotes)")


def test_yaml_option_of_wrong_type(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: aimmerging\nmethod_options:\n  fast: \"false\"\n", encoding="utf-8")
    line = _error_line(capsys, ["run", "--config", str(path)])
    assert f"{path}: method_options: aimmerging: option fast='false': must be true or false" in line


@pytest.mark.parametrize("method, options, expected", [
    ("aimmerging", {"fast": "False"}, "option fast='False': must be true or false"),
    ("ewc", {"fisher_samples": True}, "option fisher_samples=True: must be an integer"),
    ("ewc", {"ewc_lambda": "1e4"}, "option ewc_lambda='1e4': must be a number, not a string (YAML reads 1e4 as text"),
    ("agem", {"reference_batch_size": 2.0}, "option reference_batch_size=2.0: must be an integer or null, not a number"),
    ("recurrent_kif", {"empty_inner_score": "no"}, "option empty_inner_score='no': must be true or false"),
    ("dare_linear", {"seed": False}, "option seed=False: must be an integer or null, not a boolean"),
    ("ties", {"majority_sign_method": None}, "option majority_sign_method=None: must be a string, not null"),
    ("opcm", {"alpha": float("inf")}, "option alpha=inf: must be a finite number"),
])
def test_parse_options_checks_types(method, options, expected):
    cls = METHODS[method]
    with pytest.raises(ConfigError) as info:
        cls.parse_options(options)
    message = str(info.value)
    assert message.startswith(f"{method}: ") and expected in message
    assert "\n" not in message


@pytest.mark.parametrize("method, options", [
    ("aimmerging", {"fast": False, "outer_lr": 1, "probe_batch_size": None, "controller": {}}),
    ("aimmerging", {"fast": True, "initial_interval": 4}),
    ("aimmerging", {"probe_every": 2, "probe_batch_size": 4, "threshold_factor": 3}),
    ("ewc", {"ewc_lambda": 5000, "gamma": 0.5, "fisher_samples": 10}),
    ("dare_ties", {"seed": 7, "density": 1}),
    ("progprompt", {"prompt_length": 10, "lr": 0.3, "weight_decay": 1e-5, "init": "random"}),
])
def test_parse_options_accepts_well_typed_values(method, options):
    opts = METHODS[method].parse_options(options)
    for key, value in options.items():
        assert getattr(opts, key) == value


def test_cli_lowercase_false_is_a_boolean(tmp_path):
    from aimm.cli import build_parser, config_from_args

    args = build_parser().parse_args(_run_args(tmp_path, "-o", "fast=false", "-o", "outer_lr=1"))
    cfg = config_from_args(args)
    assert cfg.method_options == {"fast": False, "outer_lr": 1}
    method = build_method(cfg)
    assert method.options.fast is False


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_default_and_smoke_options_type_check(name):
    cls = METHODS[name]
    defaults = {f.name: getattr(cls.Options(), f.name) for f in dataclasses.fields(cls.Options)}
    cls.parse_options(defaults)
    cls.parse_options(dict(cls.smoke_options))


def test_reproduce_presets_type_check():
    from aimm import reproduce

    for text in (repr(getattr(reproduce, n)) for n in dir(reproduce)):
        assert "fast': 'True'" not in text  # no text booleans in presets
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            per_method = obj.get("method_options")
            if isinstance(per_method, dict):
                found.append(per_method)
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for n in dir(reproduce):
        walk(getattr(reproduce, n))
    assert found
    for per_method in found:
        for method, options in per_method.items():
            if method in METHODS and isinstance(options, dict):
                METHODS[method].parse_options(options)


# ------------------------------------------------------------------ upper bounds
def test_cli_huge_epochs_refused(capsys, tmp_path):
    line = _error_line(capsys, _run_args(tmp_path, "--epochs", "1e308"))
    assert line == f"aimm run: error: command line: epochs=1e+308: must be at most {MAX_EPOCHS} (the release trains 10)"


def test_cli_huge_seed_refused(capsys, tmp_path):
    line = _error_line(capsys, _run_args(tmp_path, "--seed", "99999999999999999999"))
    assert line == (f"aimm run: error: command line: seed=99999999999999999999: must be at most "
                    f"{MAX_SEED} (2**32 - 1)")


def test_yaml_huge_lora_r_refused(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-causal\nlora_r: 100000000000\n", encoding="utf-8")
    line = _error_line(capsys, ["run", "--config", str(path)])
    assert line.startswith(f"aimm run: error: {path}: lora_r=100000000000: must be at most {MAX_LORA_R}")


@pytest.mark.parametrize("changes", [
    {"epochs": MAX_EPOCHS}, {"lora_r": MAX_LORA_R}, {"seed": MAX_SEED}, {"buffer_seed": MAX_SEED},
    {"seed": 0},
])
def test_bounds_are_inclusive(changes):
    from aimm import config, schedule

    assert (config.MAX_EPOCHS, config.MAX_LORA_R, config.MAX_SEED, schedule.MAX_EXAMPLE_PASSES) == (
        MAX_EPOCHS, MAX_LORA_R, MAX_SEED, MAX_EXAMPLE_PASSES)
    RunConfig.from_dict({"model": "tiny-causal", **changes})


@pytest.mark.parametrize("changes, name", [
    ({"epochs": MAX_EPOCHS + 0.5}, "epochs"), ({"lora_r": MAX_LORA_R + 1}, "lora_r"),
    ({"buffer_seed": MAX_SEED + 1}, "buffer_seed"), ({"seed": 2**64}, "seed"),
])
def test_bounds_refused_naming_the_field(changes, name):
    with pytest.raises(ConfigError, match=rf"^config: {name}=[^\n]*: must be at most [^\n]*$"):
        RunConfig.from_dict({"model": "tiny-causal", **changes})


def test_plan_too_large_refused_before_planning():
    n = MAX_EXAMPLE_PASSES // 1000 + 1
    with pytest.raises(ConfigError) as info:
        plan_optimizer_steps(n, 8, 1, 1000, seed=0)
    message = str(info.value)
    assert message == (f"epochs=1000: {n} training examples x 1000 epochs exceed the limit of "
                       f"{MAX_EXAMPLE_PASSES:,} example passes in one task; lower epochs or max_train")
    assert "\n" not in message
    with pytest.raises(ConfigError, match="epochs=1e\\+308"):
        plan_micro_batches(16, 2, 1e308, seed=0)
    # a small plan is unaffected
    assert len(plan_micro_batches(16, 2, 2.5, seed=0)) == 3 * 8


# ------------------------------------------------------------------ YAML syntax errors
@pytest.mark.parametrize("text, where, problem", [
    ("epochs: 1\nlr: [1\nmodel: x\n", "3:6", "expected ',' or ']', but got ':' (while parsing a flow sequence at 2:5)"),
    ("epochs: 1\n\tlr: 3\n", "2:1", "found character '\\t' that cannot start any token"),
    ("a: b: c\n", "1:5", "mapping values are not allowed here"),
])
def test_yaml_syntax_error_is_one_line(capsys, tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    line = _error_line(capsys, ["run", "--config", str(path)])
    assert line.startswith(f"aimm run: error: {path}:{where}: invalid YAML: {problem}")


def test_yaml_nested_too_deeply_is_one_line(capsys, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n", encoding="utf-8")
    line = _error_line(capsys, ["run", "--config", str(path)])
    assert line == f"aimm run: error: {path}: invalid YAML: nested too deeply to read (lists or mappings nested thousands deep)"


@pytest.mark.parametrize("controller, expected", [
    ({"threshold_window": True}, "controller option threshold_window=True: must be a number, not a boolean"),
    ({"halve_at": "64"}, "controller option halve_at='64': must be an integer, not a string"),
    ({"adaptive": "False"}, "controller: adaptive is an option of its own; set it as adaptive="),
])
def test_aimmerging_controller_mapping_is_type_checked(controller, expected):
    """``controller: {...}`` (ControllerConfig's other fields) used to coerce: a bool was a
    number, and ``adaptive: "False"`` became True."""
    from aimm.methods import METHODS

    with pytest.raises(ConfigError) as info:
        METHODS["aimmerging"].parse_options({"controller": controller})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_controller_config_refuses_text_for_its_flag():
    from aimm.merging.controller import ControllerConfig

    with pytest.raises(ValueError, match="adaptive='False': must be true or false"):
        ControllerConfig(adaptive="False")


def test_dare_seed_option_is_bounded_like_the_run_seed():
    from aimm.config import MAX_SEED

    assert METHODS["dare_linear"].parse_options({"seed": MAX_SEED}).seed == MAX_SEED
    with pytest.raises(ConfigError, match=f"seed={MAX_SEED + 1}: must be an integer in \\[0, {MAX_SEED}\\]"):
        METHODS["dare_linear"].parse_options({"seed": MAX_SEED + 1})


# ------------------------------------------------------------------ rank against the model
def test_a_rank_above_a_targeted_layers_width_is_refused_before_allocating(tiny_data, tmp_path,
                                                                        capsys):
    """Up to MAX_LORA_R a rank was accepted whatever the model: on SmolLM2 (576 wide) r 16384
    would allocate about a billion LoRA weights that add no capacity. tiny-causal's v_proj maps
    32 to 16, so 16 is its largest useful rank."""
    def args(r: int, run: str) -> list[str]:
        path = tmp_path / f"{run}.yaml"
        path.write_text(f"lora_r: {r}\n", encoding="utf-8")
        return ["run", "--config", str(path), "--model", "tiny-causal", "--benchmark",
                "long_sequence", "--tasks", "sst-2", "--data-dir", str(tiny_data), "--run-dir",
                str(tmp_path / run), "--no-progress", "--max-train", "4", "--max-test", "2",
                "--epochs", "1"]

    line = _error_line(capsys, args(17, "r17"))
    assert line == ("aimm run: error: lora_r 17: above the width of "
                    "model.layers.0.self_attn.v_proj (32 in, 16 out) in "
                    "tiny-causal, where a rank above 16 adds weights but no capacity; choose "
                    "lora_r <= 16")
    assert not (tmp_path / "r17").exists()
    assert main(args(16, "r16")) == 0


# ------------------------------------------------------------------ ranges checked at build time
# Each of these was accepted when the method was built and then failed (or silently meant the
# default) only in training: 0 or a negative batch size inside the memory sampler, beta1 in
# Recurrent-KIF's second stage after the first was written, a misspelt controller key as a
# ControllerConfig.__init__ TypeError, a short fusion_table pair as an IndexError traceback.
@pytest.mark.parametrize("method, options, expected", [
    ("aimmerging", {"probe_batch_size": 0}, "probe_batch_size=0: must be an integer >= 1 (or null"),
    ("aimmerging", {"probe_batch_size": -3}, "probe_batch_size=-3: must be an integer >= 1"),
    ("aimmerging", {"rehearsal_batch_size": 0}, "rehearsal_batch_size=0: must be an integer >= 1"),
    ("aimmerging", {"rehearsal_batch_size": -3, "fast": True}, "rehearsal_batch_size=-3: must be an integer >= 1"),
    ("recurrent_kif", {"beta1": 5}, "beta1=5: must be a number in (0, 1)"),
    ("recurrent_kif", {"beta1": 0}, "beta1=0: must be a number in (0, 1)"),
    ("recurrent_kif", {"beta2": 1}, "beta2=1: must be a number in (0, 1)"),
    ("recurrent_kif", {"beta2": -0.5}, "beta2=-0.5: must be a number in (0, 1)"),
    ("recurrent_kif", {"outer_ratio": -1}, "outer_ratio=-1: must be a finite number >= 0"),
    ("aimmerging", {"controller": {"windw": 3}},
     "controller: unknown option 'windw' (did you mean 'window'?); controller options: threshold_window, "),
    ("aimmerging", {"controller": {"fusion_table": {"many_short": [0.5], "many_long": [0.4, 0.6],
                                                    "few_short": [0.6, 0.4], "few_long": [0.5, 0.5]}}},
     "fusion_table.many_short=[0.5]: must be [w_in, w_out], two finite numbers"),
    ("aimmerging", {"controller": {"fusion_table": {"many_short": ["a", "b"]}}},
     "fusion_table.many_short=['a', 'b']: must be [w_in, w_out]"),
    ("aimmerging", {"controller": {"fusion_table": {"many_shrt": [0.5, 0.5]}}},
     "fusion_table: unknown key 'many_shrt' (did you mean 'many_short'?)"),
    ("aimmerging", {"controller": {"fusion_table": [0.5, 0.5]}},
     "fusion_table=[0.5, 0.5]: must map many_short, many_long, few_short, few_long to [w_in, w_out]"),
])
def test_option_out_of_range_refused_when_the_method_is_built(method, options, expected):
    cfg = RunConfig.from_dict({"model": "tiny-causal", "method": method, "method_options": options})
    with pytest.raises(ConfigError) as info:
        build_method(cfg)
    message = str(info.value)
    assert message.startswith("config: method_options: ") and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("method, options", [
    ("aimmerging", {"probe_batch_size": 1, "rehearsal_batch_size": 1}),
    ("aimmerging", {"probe_batch_size": None, "rehearsal_batch_size": None, "fast": True}),
    ("recurrent_kif", {"beta1": 0.5, "beta2": 0.999, "outer_ratio": 0}),
    ("aimmerging", {"controller": {"window": 4, "fusion_table": {
        "many_short": [0.5, 0.5], "many_long": (0.4, 0.6), "few_short": [1, 0], "few_long": [0.5, 0.5]}}}),
])
def test_options_in_range_still_accepted(method, options):
    opts = METHODS[method].parse_options(options)
    for key, value in options.items():
        assert getattr(opts, key) == value


def test_fast_preset_fills_only_null_batch_sizes():
    opts = METHODS["aimmerging"].parse_options({"fast": True, "probe_batch_size": 1})
    resolved = opts.resolved(batch_size=8)
    assert (resolved.probe_batch_size, resolved.rehearsal_batch_size) == (1, 8)
    assert METHODS["aimmerging"].parse_options({"fast": True}).resolved(8).probe_batch_size == 4


def test_controller_fusion_table_survives_a_json_checkpoint():
    import json

    from aimm.merging.controller import OFFICIAL_FUSION_TABLE, MergeController

    table = {k: (w_out, w_in) for k, (w_in, w_out) in OFFICIAL_FUSION_TABLE.items()}
    controller = METHODS["aimmerging"].parse_options({"controller": {"fusion_table": table}}).make_controller()
    back = MergeController.from_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert back.config.fusion_table == table


@pytest.mark.parametrize("method, option, expected", [
    ("recurrent_kif", "beta1=5", "beta1=5: must be a number in (0, 1)"),
    ("recurrent_kif", "outer_ratio=-1", "outer_ratio=-1: must be a finite number >= 0"),
    ("aimmerging", "probe_batch_size=0", "probe_batch_size=0: must be an integer >= 1"),
    ("aimmerging", 'controller={"windw":3}', "controller: unknown option 'windw' (did you mean 'window'?)"),
])
def test_cli_option_out_of_range_is_one_line_and_writes_nothing(capsys, tmp_path, method, option,
                                                                 expected):
    argv = ["run", "--model", "tiny-causal", "--method", method, "--benchmark", "long_sequence",
            "--tasks", "sst-2,agnews", "--data-dir", str(tmp_path / "none"), "--run-dir",
            str(tmp_path / "run"), "--no-progress", "--epochs", "4", "-o", option]
    line = _error_line(capsys, argv)
    assert line.startswith("aimm run: error: command line: method_options: " + expected), line
    assert not (tmp_path / "run").exists()
