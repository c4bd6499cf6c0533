#!/usr/bin/env bash
# The demo behind `make demo`: the hybrid SAM2 + classical pipeline end to end on the bundled example.
#
# 1. a SAM2 model: $SEGSEM_MODEL if you set it (a checkpoint from `segsem finetune` started from an
#    official SAM2 checkpoint), else the micro demo model, fine-tuned here on the bundled synthetic
#    images on first run and cached in .demo/
# 2. its confidence threshold, calibrated on the bundled labelled images
# 3. `segsem extract --export gds` with gauges and the review report
# 4. `segsem evaluate` against the simulator's exact truth
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=examples/data
LAYOUT=examples/opc_test.gds
GAUGES=examples/gauges.csv
WORK=.demo
mkdir -p "$WORK"

MODEL="${SEGSEM_MODEL:-}"
if [ -z "$MODEL" ]; then
  MODEL="$WORK/micro-demo.pt"
  if [ ! -f "$MODEL" ]; then
    echo "== No official SAM2 checkpoint given (set SEGSEM_MODEL=...): fine-tuning the micro SAM2 config"
    echo "== on the bundled synthetic images. This is a DEMONSTRATION model (random init, ~1 M parameters);"
    echo "== real use starts from an official SAM2 checkpoint: segsem finetune ... --config sam2.1_hiera_t --checkpoint sam2.1_hiera_tiny.pt"
    segsem finetune "$DATA/manifest.csv" --config segsem-micro --out "$MODEL" --train full \
      --epochs "${SEGSEM_DEMO_EPOCHS:-120}" --image-size 256 --lr 2e-3 --seed 0 --loss-weights focal=1,dice=1,iou=1
  else
    echo "== using the cached demo model $MODEL (delete it to retrain)"
  fi
  echo "== calibrating the confidence threshold on the bundled labelled images"
  segsem calibrate "$DATA/manifest.csv" --model "$MODEL" --layout "$LAYOUT"
fi

echo "== extracting contours (hybrid: SAM2 per feature, threshold fallback, sub-pixel refinement)"
segsem extract "$DATA/manifest.csv" --layout "$LAYOUT" --export gds --out "$WORK/out" \
  --gauges "$GAUGES" --model "$MODEL" --report --force

echo "== scoring against the simulator's exact truth"
segsem evaluate --truth "$DATA" --pred "$WORK/out/contours.gds" --gauges "$WORK/out/gauges.csv" --json "$WORK/out/evaluation.json"

echo
echo "Outputs in $WORK/out:"
echo "  contours.gds      contours in layout nm (layer 100/0), per-polygon properties: feature, source, confidence"
echo "  gauges.csv        wafer CD per gauge, with source/confidence/status"
echo "  features.csv      per feature: source (sam2 or fallback), confidence, status"
echo "  report.html       review page (open in a browser), report.json"
echo "  overlays/*.png    contours over each SEM image"
echo "  evaluation.json   EPE and gauge CD error against the truth"
