#!/bin/sh
# onnx_setup.sh: prepares the ONNX Runtime peer benchmark.
#   1. installs onnxruntime-node 1.20.1 (CPU only) under build/onnx when
#      missing (needs Node.js 20 and npm's registry);
#   2. exports the model directory (default models/full-random, made by
#      test/bench/make_full_model.py) to build/onnx/<name>.onnx with
#      test/bench/onnx_export.py when missing, with its check data
#      build/onnx/<name>.ref.json and .ref.bin.
# Then time it with test/bench/onnx_time.mjs build/onnx/<name>.onnx.
#
# Usage: test/bench/onnx_setup.sh [MODEL_DIR]
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODEL=${1:-$ROOT/models/full-random}
NAME=$(basename "$MODEL")
OUT=$ROOT/build/onnx

if [ ! -d "$OUT/node_modules/onnxruntime-node" ]; then
	mkdir -p "$OUT"
	npm install --prefix "$OUT" onnxruntime-node@1.20.1 --onnxruntime-node-install-cuda=skip
fi

if [ ! -f "$MODEL/model.safetensors" ] && [ "$MODEL" = "$ROOT/models/full-random" ]; then
	/usr/bin/python3 "$ROOT/test/bench/make_full_model.py" "$MODEL"
fi

if [ ! -f "$OUT/$NAME.onnx" ] || [ ! -f "$OUT/$NAME.ref.bin" ]; then
	/usr/bin/python3 "$ROOT/test/bench/onnx_export.py" --model "$MODEL" --out "$OUT/$NAME.onnx"
fi
echo "$OUT/$NAME.onnx"
