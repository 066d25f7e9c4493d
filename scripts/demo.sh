#!/usr/bin/env bash
# The main job end to end on the bundled trained tiny M1 (no download): inspect, check, convert both
# ways, quantize the experts to nf4 / int8 / fp4, check each, and compare them with the original; then
# export it to GGUF (bf16, q8_0 and q4_0 experts), read it back, and run it in llama.cpp when installed.
set -euo pipefail
out=${1:-demo}
m1=.venv/bin/m1
src=tests/data/tiny-trained
rm -rf "$out" && mkdir -p "$out"

$m1 inspect "$src"
$m1 verify integrity "$src"
$m1 convert "$src" "$out/tiny-hf" --to hf --quiet
$m1 convert "$out/tiny-hf" "$out/tiny-release" --to release --layout by-layer --quiet
$m1 verify integrity "$out/tiny-release" --deep --quiet
for scheme in nf4 int8 fp4; do
  $m1 quantize "$src" "$out/tiny-$scheme" --scheme "$scheme" --quiet
  $m1 verify integrity "$out/tiny-$scheme" --quiet
done
$m1 inspect "$out/tiny-nf4"
$m1 convert "$out/tiny-nf4" "$out/tiny-nf4-bf16" --dtype bf16 --quiet
$m1 verify compare "$src" "$out/tiny-int8" "$out/tiny-nf4" "$out/tiny-fp4" --report "$out/report"

# GGUF for llama.cpp: bf16, and q8_0 / q4_0 experts with everything else as it was
$m1 convert "$src" "$out/gguf/tiny-bf16.gguf" --to gguf --quiet
for scheme in q8_0 q4_0; do
  $m1 quantize "$src" "$out/gguf/tiny-$scheme.gguf" --format gguf --scheme "$scheme" --quiet
done
$m1 inspect "$out/gguf/tiny-q4_0.gguf"
$m1 verify integrity "$out/gguf/tiny-q4_0.gguf" --quiet
$m1 convert "$out/gguf/tiny-q4_0.gguf" "$out/tiny-q4_0-imported" --to release --quiet  # import back
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  for scheme in bf16 q8_0 q4_0; do
    $m1 verify llama "$src" "$out/gguf/tiny-$scheme.gguf" --tokens 2048 --ctx 256
  done
else
  echo "llama-cpp-python is not installed, so the GGUFs were not run in llama.cpp:"
  echo "  CMAKE_ARGS=-DGGML_NATIVE=OFF .venv/bin/pip install llama-cpp-python==0.3.36   (then: m1 verify llama SRC X.gguf)"
fi
echo "demo outputs in $out/ (report: $out/report/report.md)"
