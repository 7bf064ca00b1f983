"""How many trainings does it take to get within 1% of the best validation NDCG?

DESIGN.md §1: ``beta`` (serving) costs no retraining, so a tuner can train once per ``tau``
and sweep ``beta`` for free. This benchmark measures what that saves, on the generated
``synthetic`` dataset (known truth, DESIGN.md §1), all schemes side by side in one run:

- **retrain grid**: the exhaustive ``tau x beta`` grid, one training per cell (``prior_beta``
  fixed during training, so early stopping also sees it). Its best cell is the reference
  ``best``; the target is ``0.99 * best``. Trainings to target: the expected position of the
  first cell that reaches it when the grid is visited in random order, ``(N + 1) / (k + 1)``
  for ``k`` such cells among ``N``; the full grid costs ``N``.
- **sweep grid**: one training per ``tau`` of the same grid, ``beta`` swept on validation
  (:func:`recbole_popprior.serving.sweep_beta`); same random-order formula over the taus.
- **optuna + sweep**: the plugin's tuner (:class:`recbole_popprior.tuning.objective.Objective`)
  with Optuna's TPE over ``tau in [0, 2]`` and the same ``beta`` sweep, stopped at the
  target; the median over sampler seeds (a seed that never reaches it counts as its cap + 1).

    python benchmarks/bench_tuning.py --quick      # ~45 trainings of a tiny SASRec
    python benchmarks/bench_tuning.py --quick --taus=0,1,2 --betas=0,1,2   # a smaller grid
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

import recbole_popprior  # noqa: E402,F401  (compat shims)
from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test  # noqa: E402
from recbole_popprior.serving import sweep_beta  # noqa: E402
from recbole_popprior.tuning import beta_grid, choose_beta  # noqa: E402
from recbole_popprior.tuning.objective import Objective  # noqa: E402
from recbole_popprior.tuning.space import Param  # noqa: E402

METRIC = "ndcg@10"


def base_config(data_path: Path, quick: bool, model: str) -> dict:
    return {
        "data_path": str(data_path), "synthetic_users": 250 if quick else 1000, "synthetic_items": 50,
        "synthetic_seq_len": 15 if quick else 20, "synthetic_pmi_scale": 3.0, "synthetic_zipf": 1.0,
        "epochs": 6 if quick else 15, "stopping_step": 100, "train_batch_size": 512, "eval_batch_size": 1024,
        "hidden_size": 16, "embedding_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 20, "learning_rate": 0.01, "metrics": ["NDCG", "Recall"], "topk": [10],
        "valid_metric": "NDCG@10", "show_progress": False, "state": "WARNING", "gpu_id": "", "seed": 2020,
        "reproducibility": True, "energy_permutations": 0, "prior_alpha": 1.0,
    }


def train(model: str, config_dict: dict, run_dir: Path):
    config = build_config(model, "synthetic", None, {**config_dict, "run_dir": str(run_dir)})
    pipe = build_pipeline(config)
    record = train_and_test(pipe, saved=True)
    return pipe, record


def expected_first_hit(values: list[float], target: float) -> float:
    """Expected number of draws (random order, no replacement) until a value reaches ``target``."""
    hits = sum(v >= target for v in values)
    return (len(values) + 1) / (hits + 1) if hits else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 6 epochs, 3 sampler seeds")
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--seeds", type=int, default=None, help="Optuna sampler seeds (default 3 quick, 5 full)")
    parser.add_argument("--max-trials", type=int, default=8, help="cap on Optuna trainings per seed")
    parser.add_argument("--taus", default="0,0.5,1,1.5,2", help="the grid's training weights")
    parser.add_argument("--betas", default="0,0.5,1,1.5,2", help="the grid's serving weights (also the sweep's)")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temp folder)")
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 5)
    taus = [float(t) for t in args.taus.split(",")]
    betas = [float(b) for b in args.betas.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tuning_"))
    config = base_config(workdir / "data", args.quick, args.model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)

    # 1. the exhaustive retrain grid: one training per (tau, beta)
    grid, t0 = {}, time.perf_counter()
    for tau in taus:
        for beta in betas:
            _, record = train(args.model, {**config, "prior_tau": tau, "prior_beta": beta},
                              workdir / "grid" / f"{tau}-{beta}")
            grid[tau, beta] = float(record["best_valid_result"][METRIC])
    grid_seconds = time.perf_counter() - t0
    best = max(grid.values())
    target = 0.99 * best
    best_cell = max(grid, key=grid.get)

    # 2. one training per tau, beta swept for free on the trained model
    sweep_best, t0 = {}, time.perf_counter()
    for tau in taus:
        pipe, _ = train(args.model, {**config, "prior_tau": tau, "prior_beta": None}, workdir / "sweep" / str(tau))
        rows = sweep_beta(pipe.trainer, pipe.valid_data, beta_grid(tau, betas), stage="valid")
        beta, result = choose_beta([(row.pop("beta"), row) for row in rows], METRIC, True, tau)
        sweep_best[tau] = (float(result[METRIC]), beta)
    sweep_seconds = time.perf_counter() - t0

    # 3. Optuna (TPE over tau) with the same free beta sweep, stopped at the target
    needed, found, t0 = [], [], time.perf_counter()
    space = {"prior_tau": Param("prior_tau", "float", 0.0, 2.0)}
    for seed in range(seeds):
        objective = Objective(args.model, "synthetic", None, config, space, workdir / "optuna" / str(seed),
                              METRIC, True, prune=False, betas=betas)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

        def stop_at_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.value is not None and trial.value >= target:
                study.stop()

        study.optimize(objective, n_trials=args.max_trials, callbacks=[stop_at_target])
        reached = [t.number + 1 for t in study.trials if t.value is not None and t.value >= target]
        needed.append(reached[0] if reached else args.max_trials + 1)
        found.append(study.best_value)
    optuna_seconds = time.perf_counter() - t0
    n_optuna_trainings = sum(min(n, args.max_trials) for n in needed)

    grid_needed = expected_first_hit(list(grid.values()), target)
    sweep_needed = expected_first_hit([v for v, _ in sweep_best.values()], target)
    optuna_needed = statistics.median(needed)
    rows = [
        ("retrain grid (tau x beta)", grid_needed, len(grid), max(grid.values()), grid_seconds / len(grid)),
        ("sweep grid (tau, beta free)", sweep_needed, len(taus), max(v for v, _ in sweep_best.values()),
         sweep_seconds / len(taus)),
        (f"optuna TPE + sweep (median of {seeds})", optuna_needed, n_optuna_trainings, statistics.median(found),
         optuna_seconds / max(n_optuna_trainings, 1)),
    ]
    print(f"\n{args.model} on synthetic ({config['synthetic_users']} users x {config['synthetic_seq_len']} steps, "
          f"{config['synthetic_items']} items, {config['epochs']} epochs); taus {taus}, betas {betas}")
    print(f"reference: best {METRIC} of the retrain grid = {best:.4f} at tau={best_cell[0]}, beta={best_cell[1]}; "
          f"target (within 1%) = {target:.4f}")
    print("retrain grid (rows tau, columns beta):")
    for tau in taus:
        print(f"  tau={tau:<4} " + " ".join(f"{grid[tau, b]:.4f}" for b in betas)
              + f"   | sweep: best {sweep_best[tau][0]:.4f} at beta={sweep_best[tau][1]:g}")
    print(f"optuna trainings to target per seed: {needed} (cap {args.max_trials}; cap+1 = never)")
    print()
    print(f"| {'scheme':<38} | trainings to within 1% | trainings run | best {METRIC} | s/training |")
    print(f"|{'-' * 40}|{'-' * 24}|{'-' * 15}|{'-' * 14}|{'-' * 12}|")
    for name, need, total, value, per in rows:
        print(f"| {name:<38} | {need:>22.2f} | {total:>13d} | {value:>12.4f} | {per:>10.2f} |")
    print()
    print(f"ratio, trainings to target: retrain grid / optuna+sweep = {grid_needed / optuna_needed:.2f}x; "
          f"retrain grid / sweep grid = {grid_needed / sweep_needed:.2f}x")
    print(f"ratio, trainings for the whole exhaustive search: {len(grid)} / {len(taus)} = "
          f"{len(grid) / len(taus):.1f}x (the sweep grid finds {max(v for v, _ in sweep_best.values()) / best:.4f} of best)")
    print(f"workdir: {workdir}")
    import torch

    if torch.is_anomaly_enabled():
        print("note: torch anomaly detection is on (set by RecBole's sine.py at import); s/training is inflated")


if __name__ == "__main__":
    main()
