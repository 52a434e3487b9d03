#!/usr/bin/env bash
# The second environment, in .venv-optimum: d2v-export on transformers 4.57 beside optimum-onnx 0.1.0 and
# optimum-intel[openvino] 1.27, for tests/test_ecosystem.py (bundles loaded with ORTModelFor* / OVModelFor*)
# and tests/test_heads.py on transformers 4.x. optimum-onnx pins transformers<4.58, so it cannot share .venv
# with transformers 5 (docs/DESIGN.md). Idempotent; works offline except for the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${D2V_OPTIMUM_VENV:-.venv-optimum}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch lets pip pick a multi-GB CUDA build; 2.13.0 is a small CPU build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints-optimum.txt -e ".[openvino,test]" "optimum-onnx[onnxruntime]" "optimum-intel[openvino]"
