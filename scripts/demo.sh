#!/usr/bin/env bash
# The main job end to end on the bundled trained tiny M1 (no download): inspect, check, convert both
# ways, quantize the experts to nf4 / int8 / fp4, check each, and compare them with the original.
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
echo "demo outputs in $out/ (report: $out/report/report.md)"
