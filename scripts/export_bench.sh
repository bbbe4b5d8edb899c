#!/usr/bin/env bash
# docs/EXPORT.md's measurements: one run exported in both formats, each verified on the whole test set and timed
# under onnxruntime (ORT_ENABLE_ALL) beside the float network, with the same threads as the campaign lanes use.
#
#   scripts/export_bench.sh RUN_DIR NAME      -> docs/bench/export_NAME_{exact,qdq,qdq_residual_float}.json
#
# Pause anything else running on the machine while it times (the CIFAR lanes: kill -STOP / -CONT their qtrain).
set -euo pipefail
cd "$(dirname "$0")/.."
run=$1 name=$2
export QTRAIN_DATA="${QTRAIN_DATA:-$(cd ../shared/data 2>/dev/null && pwd)}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
out=$(mktemp -d)
for variant in exact qdq qdq_residual_float; do
  case $variant in
    exact) options=(--format exact) ;;
    qdq) options=(--format qdq) ;;  # residual adds on integer kernels (the default)
    qdq_residual_float) options=(--format qdq --residual float) ;;
  esac
  .venv/bin/qtrain-export "$run" "${options[@]}" --verify --bench --data-root "$QTRAIN_DATA" --out "$out/$variant" \
    > /dev/null
  .venv/bin/python - "$out/$variant/export.json" "docs/bench/export_${name}_${variant}.json" "$run" "$name" <<'PY'
import json, platform, sys
import onnxruntime, torch
report = json.load(open(sys.argv[1]))
report.update(machine=f"{platform.machine()}, {platform.processor() or '?'}", torch=torch.__version__,
              onnxruntime=onnxruntime.__version__, threads=torch.get_num_threads(),
              command=f"scripts/export_bench.sh {sys.argv[3]} {sys.argv[4]}")
for k in ("safetensors", "onnx"):
    report.pop(k, None)  # temporary paths
json.dump(report, open(sys.argv[2], "w"), indent=2)
print(sys.argv[2])
PY
done
rm -rf "$out"
