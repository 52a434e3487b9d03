#!/usr/bin/env bash
# TensorRT device check for d2v-export, in one go, on a machine with an NVIDIA GPU, TensorRT 10.x or 11.x and
# d2v-export installed: pip install "d2v-export[tensorrt,test]" --extra-index-url https://pypi.nvidia.com
# (TensorRT 10 / CUDA 12, driver R525+), or [tensorrt-cu13,test] for TensorRT 11 / CUDA 13 (driver R580+).
# Jetson (JetPack 6.1/6.2): JetPack's TensorRT 10.3 and python3, no pip tensorrt/cuda-python (`d2v-export doctor` says).
#
#   bash scripts/tensorrt_device_check.sh [MODEL] [OUT]        # MODEL default preset:base (vision), OUT default trt-check
#
# 1. writes deferred fp16 and int8 bundles (the int8 one: Q/DQ graph with its fp16 remainder),
# 2. builds both engines with trtexec (build_engine.sh: strongly typed, no precision flag, fp16/int8 typed in the
#    graph) and exports per-layer information (layers.json: which layers run int8/fp16, what fused),
# 3. prints trtexec's GPU compute time of both side by side (is int8 faster than fp16 here?),
# 4. builds both again with `d2v-export build-engine` (engine_manifest.json: CUDA-event latency, check vs ONNX Runtime),
# 5. runs the GPU tests (pytest -m gpu tests/test_tensorrt.py tests/test_trt_device.py).
# Send back OUT/summary.txt, OUT/*/engine_manifest.json and OUT/*/layers.json.
set -euo pipefail
MODEL="${1:-preset:base}"
OUT="${2:-trt-check}"
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
export TRTEXEC
python3 -c "import tensorrt, sys; print('TensorRT', tensorrt.__version__, 'Python', sys.version.split()[0])"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

d2v-export vision --model "$MODEL" --target tensorrt --fp16 --int8 --defer-build --batch-size 1:1:8 --output "$OUT" --force
summary="$OUT/summary.txt"
: > "$summary"
for bundle in "$OUT"/tensorrt-fp16 "$OUT"/tensorrt-int8-static; do
    [ -d "$bundle" ] || { echo "missing $bundle" | tee -a "$summary"; continue; }
    name=$(basename "$bundle")
    ( cd "$bundle" && bash build_engine.sh --separateProfileRun --iterations=500 --warmUp=500 ) > "$OUT/$name.trtexec.log" 2>&1 \
        || { echo "$name: trtexec failed, see $OUT/$name.trtexec.log" | tee -a "$summary"; continue; }
    gpu=$(grep -E "GPU Compute Time:" "$OUT/$name.trtexec.log" | tail -1 || true)
    echo "$name  trtexec ${gpu#*] }" | tee -a "$summary"
    # count layer precisions from the layer info (int8 vs fp16 vs fp32 outputs)
    python3 - "$bundle/layers.json" >> "$summary" <<'EOF' || true
import json, sys, collections
doc = json.load(open(sys.argv[1]))
kinds = collections.Counter()
for layer in doc.get("Layers", []):
    if isinstance(layer, dict):
        outs = layer.get("Outputs") or [{}]
        kinds[str(outs[0].get("Format/Datatype", "?")).split()[0]] += 1
print("   layer output types:", dict(kinds))
EOF
    cp "$bundle/layers.json" "$OUT/$name.layers.json" 2>/dev/null || true
    python3 -c "import sys; from d2v_export.deploy import bundle; bundle.verify(sys.argv[1]); print('   verifies after build_engine.sh')" "$bundle" \
        | tee -a "$summary"  # the manifest was relisted by trt_device.py record
    python3 "$bundle/trt_device.py" probe | tee -a "$summary"
    d2v-export build-engine "$bundle" --iterations 500 | tee -a "$summary"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('   build-engine p50 ms', m['benchmark']['p50_ms'], 'check vs ORT', m.get('check_vs_onnxruntime'))" \
        "$bundle/engine_manifest.json" | tee -a "$summary"
done
python3 -m pytest -q -m gpu tests/test_tensorrt.py tests/test_trt_device.py 2>&1 | tail -5 | tee -a "$summary"
echo "wrote $summary"
