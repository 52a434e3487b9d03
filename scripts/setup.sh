#!/usr/bin/env bash
# Set up a virtual environment in .venv with d2v-export, its OpenVINO and datasets extras and the test tools.
# Idempotent: a second run only checks. Works offline except for the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch lets pip pick a multi-GB CUDA build; 2.13.0 is a small CPU build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[openvino,test,examples,datasets,serve]"
# Type stubs for the TensorRT API (the runtime itself needs NVIDIA's index and a GPU): no dependencies,
# because tensorrt-stubs depends on the tensorrt wheel, which cannot install here.
python -m pip install -q --no-deps -c constraints.txt tensorrt-stubs
