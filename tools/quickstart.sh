#!/usr/bin/env bash
# The main job on the built-in synthetic data, from a fresh machine:
#   set up -> train configs/quickstart.py (makes the synthetic set on first use) -> predict the synthetic
#   test images -> score against their truth, next to the all-empty submission's score.
# Usage: bash tools/quickstart.sh [WORKDIR]   (default ./runs/quickstart; an existing workdir resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/quickstart}"
DATA="${SEVERJAX_SYNTHETIC_DIR:-$HOME/.cache/severjax/synthetic}"

python -m pip install --quiet --disable-pip-version-check -r requirements.txt
python -m pip install --quiet --disable-pip-version-check --no-deps -e .

python -m severjax.train --config=configs/quickstart.py --workdir="$WORKDIR" --config.data.dir="$DATA"
python tools/predict.py --checkpoint "$WORKDIR" --images "$DATA/test_images" \
  --sample_submission "$DATA/sample_submission.csv" --out "$WORKDIR/submission.csv"

python - "$DATA/test_truth.csv" "$WORKDIR/empty_submission.csv" <<'PY'
import sys
from severjax.data import kaggle
truth = kaggle.read_submission(sys.argv[1])
kaggle.write_submission(sys.argv[2], {k: [""] * 4 for k in truth})
PY
echo "== all-empty submission =="
python tools/score.py --truth "$DATA/test_truth.csv" --submission "$WORKDIR/empty_submission.csv" | tail -n 1
echo "== quickstart model =="
python tools/score.py --truth "$DATA/test_truth.csv" --submission "$WORKDIR/submission.csv"
