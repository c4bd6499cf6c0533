#!/usr/bin/env bash
# Regenerate the bundled example: the OPC test layout, its gauges and two small synthetic datasets.
#   examples/opc_test.gds, gauges.csv, sites.csv   (python examples/make_example_layout.py)
#   examples/data/           6 images 384x384 px at 1 nm/px of layer 1/0 (resist lines), noise easy/medium/hard
#   examples/data_contacts/  2 images 384x384 px of layer 2/0 (contact holes: openings in resist)
# Deterministic: the same seeds give byte-identical files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SEGSEM="${SEGSEM:-segsem}"
"$PY" examples/make_example_layout.py
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
awk -F, 'NR == 1 || $1 ~ /^(VLS_30_60|HLS_40_80|TIP2TIP|END2LINE|L_T_SHAPES|LOGIC_a)$/' examples/sites.csv > "$tmp/lines.csv"
awk -F, 'NR == 1 || $1 ~ /^(CT_40_100|CT_MISC)$/' examples/sites.csv > "$tmp/contacts.csv"
"$SEGSEM" synth examples/opc_test.gds --out examples/data --sites "$tmp/lines.csv" --size 384 --pixel-nm 1.0 \
  --noise mixed --seed 2024 --defects 0.08 --gauges examples/gauges.csv --force
"$SEGSEM" synth examples/opc_test.gds --layer 2/0 --tone opening --out examples/data_contacts --sites "$tmp/contacts.csv" \
  --size 384 --pixel-nm 1.0 --noise medium --seed 2024 --param corner_radius_nm=14 --gauges examples/gauges.csv --force
du -sh examples/data examples/data_contacts examples/opc_test.gds
