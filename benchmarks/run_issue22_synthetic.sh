#!/usr/bin/env bash
# The synthetic tau sweeps of docs/results/synthetic-tau-sweep.md (docs/DESIGN.md §12), one after the
# other. Resumable: rerun the script and every complete (tau, seed) run is kept, a killed one restarts.
#   OUT=issue22-runs bash benchmarks/run_issue22_synthetic.sh           # all four sweeps, then the figure
#   ONLY=known-truth bash benchmarks/run_issue22_synthetic.sh           # one sweep
set -euo pipefail
OUT=${OUT:-issue22-runs}
PY=${PY:-python}
ONLY=${ONLY:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread each is fastest on a shared CPU
C=benchmarks/configs
SWEEP=(benchmarks/tau_sweep.py --model=SASRec --dataset=synthetic)

sweep() {
    local name=$1; shift
    if [[ -n "$ONLY" && "$ONLY" != "$name" ]]; then return; fi
    echo "== $name: $(date)"
    "$PY" "${SWEEP[@]}" --output="$OUT/$name" --data_path="$OUT/data-$name" "$@"
}

# 1. known truth: 100 items, 250k interactions; tau curve with the estimated and the true prior
sweep known-truth --config_files="$C/synthetic-known-truth.yaml" --taus=0,0.5,1,1.5,learned \
    --prior-sources=estimate,truth --seeds=3
# 2. PMI that is correlated with popularity (planted): the floor rises, separation must not remove it
sweep pop-pmi --config_files="$C/synthetic-known-truth.yaml $C/synthetic-pop-pmi.yaml" --taus=0,0.5,1,1.5 --seeds=3
# 3. time-varying popularity: static vs windowed prior, subspace_frac
sweep windows --config_files="$C/synthetic-known-truth.yaml $C/synthetic-windows.yaml" --taus=0,1 \
    --prior-modes=static,windowed --seeds=3
# 4. ten times less data: estimation of p_hat and of the model from few counts
sweep small-data --config_files="$C/synthetic-known-truth.yaml $C/synthetic-small-data.yaml" \
    --taus=0,0.5,1,1.5,learned --prior-sources=estimate,truth --seeds=3

if [[ -z "$ONLY" ]]; then
    "$PY" benchmarks/tau_sweep.py --plot "$OUT/known-truth/sweep.json" "$OUT/pop-pmi/sweep.json" \
        "$OUT/small-data/sweep.json" --figure="$OUT/tau-sweep-synthetic.png" \
        --titles="known truth (250k interactions)|PMI correlated with popularity (planted)|10x less data (15k)"
fi
