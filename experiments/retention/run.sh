#!/bin/bash
# The retention study: held-out task score against drift from the base (retention/kl, retention/agreement)
# at the same number of steps, over rank, targets, DoRA and the NF4 base. ~25 minutes on a 2-core CPU.
# Usage: experiments/retention/run.sh [out folder, default /tmp/study_retention]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/study_retention}
PY=${PY:-.venv/bin/python}
# As experiments/rank_alpha: 60 steps, 50 held-out rows, the base scored once (first run only).
COMMON=(trainer.max_steps=60 trainer.val_check_interval=20 data.test_size=50 trainer.enable_progress_bar=false
        output_root="$OUT")
run() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  "$PY" -m lit_lora.train "${COMMON[@]}" output_dir="$OUT/$name" "$@" 2>&1 | grep "lit-lora:" | tail -6
}
mkdir -p "$OUT"
# Rank, attention projections, alpha = 2r (the default's ratio) so that the update's scale stays fixed.
run r2 lora.r=2 lora.alpha=4
run r8 lora.r=8 lora.alpha=16 score_base=false
run r32 lora.r=32 lora.alpha=64 score_base=false
run r128 lora.r=128 lora.alpha=256 score_base=false
# Targets, DoRA, the 4-bit base: each against r8.
run r8-all-linear lora=all-linear lora.r=8 lora.alpha=16 score_base=false
run r8-dora lora=dora lora.r=8 lora.alpha=16 score_base=false
run r8-nf4 quant=nf4 lora.r=8 lora.alpha=16 score_base=false
"$PY" -m lit_lora.compare "$OUT"/r2 "$OUT"/r8 "$OUT"/r32 "$OUT"/r128 "$OUT"/r8-all-linear "$OUT"/r8-dora "$OUT"/r8-nf4 \
  --out experiments/retention
