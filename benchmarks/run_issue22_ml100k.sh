#!/usr/bin/env bash
# The ml-100k runs of issue 22 (docs/DESIGN.md §12): the converged matched comparison at RecBole's own
# SASRec and GRU4Rec defaults (3 seeds, early stopping that stops) and SASRec's tau curve.
# Resumable: rerun the script and every complete (tau, seed) run is kept; a killed one restarts.
#
#   OUT=issue22-ml100k bash benchmarks/run_issue22_ml100k.sh              # everything, one run at a time
#   ONLY=sasrec bash benchmarks/run_issue22_ml100k.sh                      # one of: sasrec, gru4rec
#   PRESET=properties/fast.yaml bash benchmarks/run_issue22_ml100k.sh      # with the speed preset (bf16 AMP,
#                                                                          # fast kernels; PRESET=fast works too)
#   SEEDS=1 TAUS=0,1 bash benchmarks/run_issue22_ml100k.sh                 # fewer seeds / taus first; a later
#                                                                          # run with more resumes, keeping these
#   SMOKE=1 bash benchmarks/run_issue22_ml100k.sh                          # 1 epoch, 1 seed, tiny models
#
# TAUS replaces both models' tau lists (it must hold 0, the reference of every run); the comparison
# (--compare-tau=1) is written when the list holds 1. A saved run with other settings (the preset
# file's contents count) is refused, never mixed in: runs with and without PRESET need their own OUT.
#
# SASRec: taus 0, 0.5, 1, 1.5, learned x 3 seeds; its tau=0 and tau=1 runs are also the matched
# comparison (OUT/ml100k-sasrec/compare/compare.md, the report --compare writes), so the comparison
# costs no extra training. GRU4Rec: tau 0 and 1 x 3 seeds, and its comparison.
set -euo pipefail
OUT=${OUT:-issue22-ml100k}
PY=${PY:-python}
ONLY=${ONLY:-}
SEEDS_GIVEN=${SEEDS:-}
SEEDS=${SEEDS:-3}
TAUS=${TAUS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
COMMON=(--dataset=ml-100k --epochs=50 --stopping_step=5 --valid_metric=NDCG@10 --show_progress=False)
if [[ -n "${PRESET:-}" ]]; then
    # a preset's name (fast, fast.yaml) is the file shipped in properties/; the sweep digests the file itself
    if [[ ! -f "$PRESET" && -f "properties/${PRESET%.yaml}.yaml" ]]; then PRESET="properties/${PRESET%.yaml}.yaml"; fi
    if [[ ! -f "$PRESET" ]]; then echo "error: PRESET=$PRESET: no such file" >&2; exit 2; fi
    COMMON+=(--config_files="$PRESET")
fi
if [[ -n "${SMOKE:-}" ]]; then
    OUT=${OUT}-smoke
    SEEDS=${SEEDS_GIVEN:-1}
    # the same commands, 1 epoch of a tiny model and a short permutation null: proves the pipeline only
    COMMON+=(--epochs=1 --hidden_size=16 --embedding_size=16 --inner_size=32 --n_layers=1 --n_heads=1
             --MAX_ITEM_LIST_LENGTH=20 --train_batch_size=512 --energy_permutations=199)
fi

sweep() {
    local name=$1 model=$2 taus=${TAUS:-$3} compare=()
    if [[ -n "$ONLY" && "$ONLY" != "$name" ]]; then return; fi
    if [[ ",${taus// /}," =~ ,1(\.0*)?, ]]; then compare=(--compare-tau=1); fi
    echo "== $name: taus $taus, $SEEDS seed(s), ${PRESET:-no preset}: $(date)"
    "$PY" benchmarks/tau_sweep.py "${COMMON[@]}" "${compare[@]}" --model="$model" --taus="$taus" \
        --seeds="$SEEDS" --output="$OUT/ml100k-$name"
}

sweep sasrec SASRec 0,0.5,1,1.5,learned
sweep gru4rec GRU4Rec 0,1

if [[ -z "$ONLY" && -f "$OUT/ml100k-sasrec/sweep.json" ]]; then
    # the figure with the synthetic panel, when those runs are at SYNTHETIC (benchmarks/run_issue22_synthetic.sh)
    SYNTHETIC=${SYNTHETIC:-issue22-runs}
    PANELS=("$OUT/ml100k-sasrec/sweep.json")
    TITLES="SASRec on ml-100k (RecBole defaults)"
    if [[ -f "$SYNTHETIC/known-truth/sweep.json" ]]; then
        PANELS=("$SYNTHETIC/known-truth/sweep.json" "${PANELS[@]}")
        TITLES="SASRec on synthetic data (known truth)|$TITLES"
    fi
    "$PY" benchmarks/tau_sweep.py --plot "${PANELS[@]}" --titles="$TITLES" --figure="$OUT/tau-sweep.png"
fi
