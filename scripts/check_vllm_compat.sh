#!/usr/bin/env bash
# Check d2serve's vLLM plugin against the vLLM installed in another virtual environment (e.g. the CUDA `vllm`
# wheel of a release the plugin does not pin here; it imports on a CPU machine), without starting an engine:
#   1. install this checkout into VENV (--no-deps: VENV keeps its own torch, transformers and vLLM);
#   2. print vLLM's version, the source hash and parameters of every patched method, and compat.problems();
#   3. run the plugin's mocked-layer tests (tests/test_vllm_plugin_compat.py, tests/test_vllm_prompt_logprobs.py
#      without its engine test) with VENV's Python.
# Usage: scripts/check_vllm_compat.sh VENV        (VENV has vllm, torch, transformers, peft, pytest installed)
# Exit 0: the plugin would be active on that vLLM and its tests pass; what needs a GPU is not run (see docs/vllm.md).
set -euo pipefail
venv=${1:?usage: scripts/check_vllm_compat.sh VENV}
cd "$(dirname "$0")/.."
py="$venv/bin/python"
"$py" -m pip install --quiet --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" - <<'PY'
import json, sys
import torch, transformers, vllm
from d2serve.vllm_plugin import compat
print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                  "patch_points": compat.fingerprint(), "problems": compat.problems(vllm.__version__)}, indent=1))
sys.exit(1 if compat.problems(vllm.__version__) else 0)
PY
"$py" -m pytest -q -p no:cacheprovider tests/test_vllm_plugin_compat.py tests/test_vllm_prompt_logprobs.py \
    -k "not transformers"  # everything but the engine test
