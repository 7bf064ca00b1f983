"""Scale benchmark on UserBehavior-shaped logs: time and peak memory per phase.

    python benchmarks/bench_scale.py --rows 1000000 10000000 [--repeats 3] [--recbole-max-rows 2000000]
    BENCH_SCALE_BIG=1 python benchmarks/bench_scale.py --rows 100000000 --repeats 1 --eval-batches 2

For each size it generates (once, cached under ``--cache``) a raw Tianchi UserBehavior-shaped
csv: no header, ``user_id,item_id,category_id,behavior_type,timestamp``; about 100 events per
user, a catalogue of 4.2 items per user (the real file: 4.16M items for 988k users), item
popularity Zipf-like (``--zipf``), 89% page views, timestamps in 2017-11-25..2017-12-03 UTC+8.
Then every phase runs in a fresh subprocess, which reports its wall time and its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at exit):

- ``convert``: ``recbole_popprior.converters.convert("tianchi", ...)`` (page views, dedup);
- ``load_prepare``: ``create_dataset`` + ``data_preparation`` + the first training batch of
  SASRec on the converted ``tianchi`` dataset (``dataset_configs/tianchi.yaml``: 5-core,
  ``MAX_ITEM_LIST_LENGTH: 50``, leave-one-out), with ``sequence_data: lean`` and, side by side,
  ``sequence_data: recbole`` (the plugin's previous default: RecBole's augmentation after the fast
  loader) up to ``--recbole-max-rows`` raw rows (above that it needs more memory than this
  machine shares: about 1.9 kB per interaction).
- ``train``: the same load, then SASRec at RecBole's defaults (hidden 64, 2 layers, batch 2048)
  trained on the first batches of an epoch with sampled softmax (``--negatives``, popularity
  sampler) and, up to ``--full-softmax-max-rows``, with the full softmax; steady-state rows/s
  after a warm-up, and the epoch time extrapolated from it. Its peak RSS is the whole run's
  (load, prepare and training).
- ``evaluate``: full-sort evaluation of the test split with Recall/NDCG@10 and PopEnergy in
  bounded memory; ``--eval-batches N`` times the first N batches and extrapolates.

Start-up is the peak RSS of the same phase on a tiny log (``--startup-rows``); "bytes per
interaction" is ``(peak - start-up) / rows of tianchi.inter``. With two sizes or more, the
marginal bytes per interaction (the slope of peak RSS between the smallest and largest size)
are printed too: fixed costs that a tiny log does not show (pyarrow's read-ahead) cancel there. A new
phase goes into :data:`PHASES`: a function that runs in the child and returns a dict, plus a
line in :func:`measure`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
T0, T1 = 1511539200, 1512316799  # 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 UTC+8
EVENTS_PER_USER = 100
ITEMS_PER_USER = 4.2


# ----------------------------------------------------------------------------- the raw log
def generate(path: Path, rows: int, zipf: float = 1.1, seed: int = 0, chunk_users: int = 20_000) -> Path:
    """Write a UserBehavior-shaped csv (no header), user after user, in chunks."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if path.exists() and path.stat().st_size > 0:
        return path
    rng = np.random.default_rng(seed)
    counts = rng.geometric(1 / EVENTS_PER_USER, size=rows // EVENTS_PER_USER * 2 + 10)
    counts = counts[: np.searchsorted(np.cumsum(counts), rows) + 1]
    counts[-1] -= counts.sum() - rows
    n_users = len(counts)
    n_items = max(10, round(ITEMS_PER_USER * n_users))
    user_ids = np.cumsum(rng.integers(1, 3, size=n_users))  # gaps, as in the real ids
    # Zipf-like ranks by inverse transform of p(r) ~ r^-zipf on [1, n_items], then a fixed
    # bijection rank -> item id (a multiplier coprime with n_items)
    multiplier = next(m for m in range(2654435761, 2654435761 + 10_000) if np.gcd(m, n_items) == 1)
    names = np.array(["pv", "buy", "cart", "fav"])
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as handle:
        for first in range(0, n_users, chunk_users):
            per_user = counts[first:first + chunk_users]
            m = int(per_user.sum())
            users = np.repeat(user_ids[first:first + chunk_users], per_user)
            rank = _zipf_ranks(rng, m, n_items, zipf)
            items = (rank * multiplier) % n_items + 1
            behaviors = names[rng.choice(4, size=m, p=[0.894, 0.021, 0.056, 0.029])]
            stamps = rng.integers(T0, T1 + 1, size=m)
            table = pa.table({"u": users, "i": items, "c": items % 9439 + 1, "b": behaviors, "t": stamps})
            sink = pa.BufferOutputStream()
            pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, quoting_style="none"))
            handle.write(sink.getvalue().to_pybytes())
    os.replace(tmp, path)
    return path


def _zipf_ranks(rng: np.random.Generator, m: int, n: int, s: float) -> np.ndarray:
    """``m`` ranks in ``[0, n)`` with ``p(r) ~ (r + 1)^-s`` (continuous inverse transform)."""
    u = rng.random(m)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1))
    else:
        x = (1 + u * ((n + 1) ** (1 - s) - 1)) ** (1 / (1 - s))
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


# ----------------------------------------------------------------------------- phases (in the child)
def phase_convert(raw: str, out: str, **_) -> dict:
    from recbole_popprior.converters.pipeline import convert

    summary = convert("tianchi", raw, out, progress=False)
    return {"rows": int(summary["rows_kept"])}


def phase_load_prepare(out: str, sequence_data: str, **_) -> dict:
    import torch

    from recbole.utils import init_seed

    from recbole_popprior.config import Config
    from recbole_popprior.data import create_dataset, data_preparation

    torch.set_num_threads(1)
    config = Config(model="SASRec", dataset="tianchi", config_dict={
        "data_path": out, "gpu_id": "", "state": "WARNING", "show_progress": False,
        "sequence_data": sequence_data})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    str(dataset)  # the quick start logs it
    train, valid, test = data_preparation(config, dataset)
    batch = next(iter(train))
    return {"users": int(dataset.user_num - 1), "items": int(dataset.item_num - 1),
            "train_examples": len(train.dataset), "batch": len(batch), "dataset_class": type(dataset).__name__}


def _pipeline(out: str, threads: int, **settings):
    """Config, data, SASRec (RecBole's defaults: hidden 64, 2 layers) and the plugin's trainer."""
    import torch
    from recbole.utils import init_seed

    from recbole_popprior.config import Config
    from recbole_popprior.data import create_dataset, data_preparation
    from recbole_popprior.trainer import get_trainer

    torch.set_num_threads(threads)
    config = Config(model="SASRec", dataset="tianchi", config_dict={
        "data_path": out, "gpu_id": "", "state": "WARNING", "show_progress": False, **settings})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = config.model_class(config, train._dataset)
    return config, dataset, train, test, model, get_trainer(config)(config, model)


def phase_train(out: str, negatives: int, steps: int, warmup: int, threads: int, **_) -> dict:
    """Steady-state training rows/s of one epoch's batches (forward, backward, the optimiser step);
    the epoch time is extrapolated from it (said so in the table)."""
    config, dataset, train, _, model, trainer = _pipeline(out, threads, softmax_negatives=negatives,
                                                          softmax_sampler="popularity")
    model.train()
    times, rows = [], []
    for k, batch in enumerate(train):
        if k >= warmup + steps:
            break
        start = time.perf_counter()
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()
        if k >= warmup:
            times.append(time.perf_counter() - start)
            rows.append(len(batch))
    rate = sum(rows) / sum(times)
    examples = len(train.dataset)
    return {"items": int(dataset.item_num - 1), "train_examples": examples, "steps": len(times),
            "rows_per_s": rate, "epoch_s_extrapolated": examples / rate, "negatives": negatives}


def phase_evaluate(out: str, max_batches: int, threads: int, eval_path: str = "plugin", **_) -> dict:
    """Full-sort evaluation of the test split (untrained weights: the cost does not depend on them)
    with RecBole's top-k metrics and PopEnergy, in bounded memory (``eval_score_budget_mb``); with
    ``max_batches`` the time of the first batches is extrapolated to all of them. ``eval_path``:
    ``plugin`` (today's) or ``previous`` (``bench_eval_step.previous_evaluation``)."""
    import torch

    config, dataset, _, test, model, trainer = _pipeline(
        out, threads, metrics=["Recall", "NDCG", "PopEnergy"], valid_metric="NDCG@10", topk=[10])
    if eval_path == "previous":
        from bench_eval_step import previous_evaluation  # the same script folder

        previous_evaluation(trainer)
    trainer.eval_collector.data_collect(test)
    batches = len(test)
    done = min(max_batches or batches, batches)
    if done < batches:
        # RecBole's evaluate dispatches on the loader's class and iterates it: a subclass that
        # stops after ``done`` batches keeps everything else of the real loader
        class FirstBatches(type(test)):
            def __iter__(self):
                return itertools.islice(super().__iter__(), done)

        test.__class__ = FirstBatches
    start = time.perf_counter()
    with torch.no_grad():
        result = trainer.evaluate(test, load_best_model=False)
    seconds = time.perf_counter() - start
    return {"items": int(dataset.item_num - 1), "batches": batches, "evaluated_batches": done,
            "eval_s": seconds, "eval_s_extrapolated": seconds * batches / done, "eval_path": eval_path,
            "contexts": int(result.get("pop_contexts", 0)), "budget_mb": config["eval_score_budget_mb"],
            "ndcg": float(result["ndcg@10"])}


#: phase name -> function run in the child; it returns a dict of what it saw
PHASES: dict[str, Callable[..., dict]] = {"convert": phase_convert, "load_prepare": phase_load_prepare,
                                          "train": phase_train, "evaluate": phase_evaluate}


def child(phase: str, options: dict) -> None:
    import recbole_popprior.config  # noqa: F401  (imports are start-up, not the phase)
    import recbole_popprior.converters.pipeline  # noqa: F401
    import recbole_popprior.data  # noqa: F401

    start = time.perf_counter()
    result = PHASES[phase](**options)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- the parent
def run_phase(phase: str, repeats: int, **options) -> dict:
    """Median wall time and peak RSS over ``repeats`` fresh subprocesses."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--child", phase, json.dumps(options)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(lines[-1][7:]))
    out = dict(runs[0])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["peak_rss"] = statistics.median(r["peak_rss"] for r in runs)
    out["all_seconds"] = [round(r["seconds"], 1) for r in runs]
    out["all_peak_gb"] = [round(r["peak_rss"] / 2**30, 2) for r in runs]
    return out


def prepare(cache: Path, rows: int, zipf: float) -> tuple[Path, Path]:
    raw = generate(cache / f"UserBehavior_{rows}.csv", rows, zipf=zipf)
    return raw, cache / f"converted_{rows}"


def measure(rows: int, args, startup: dict) -> list[dict]:
    raw, out = prepare(Path(args.cache), rows, args.zipf)
    results = []
    inter = out / "tianchi" / "tianchi.inter"
    if "convert" in args.phases or not inter.exists():
        converted = run_phase("convert", args.repeats if "convert" in args.phases else 1, raw=str(raw), out=str(out))
    else:  # converted by an earlier run: its rows, without converting again
        with open(inter, "rb") as handle:
            converted = {"rows": sum(block.count(b"\n") for block in iter(lambda: handle.read(2**24), b"")) - 1}
    if "convert" in args.phases:
        results.append({"phase": "convert", "path": "plugin", **converted})
    paths = ["lean"] + (["recbole"] if rows <= args.recbole_max_rows else [])
    for path in paths if "load_prepare" in args.phases else []:
        r = run_phase("load_prepare", args.repeats if path == "lean" else args.recbole_repeats,
                      out=str(out), sequence_data=path)
        r["bytes_per_interaction"] = (r["peak_rss"] - startup[path]) / converted["rows"]
        results.append({"phase": "load_prepare", "path": path, **r})
    for negatives in ([args.negatives] + ([0] if rows <= args.full_softmax_max_rows else [])
                      if "train" in args.phases else []):
        r = run_phase("train", 1, out=str(out), negatives=negatives, steps=args.train_steps,
                      warmup=args.warmup_steps, threads=args.threads)
        results.append({"phase": "train", "path": f"K={negatives}" if negatives else "full", **r})
    runs: dict[str, list[dict]] = {path: [] for path in args.eval_paths}
    for i in range(args.eval_repeats if "evaluate" in args.phases else 0):  # the paths alternate, so neither always meets the same load
        for path in (args.eval_paths if i % 2 == 0 else args.eval_paths[::-1]):
            runs[path].append(run_phase("evaluate", 1, out=str(out), max_batches=args.eval_batches,
                                        threads=args.threads, eval_path=path))
    for path, done in runs.items():
        r = dict(done[0])
        for key in ("seconds", "eval_s", "eval_s_extrapolated"):
            r[key] = statistics.median(d[key] for d in done)
        r["all_seconds"] = [round(d["eval_s"], 1) for d in done]
        results.append({"phase": "evaluate", "path": path, **r})
    for r in results:
        r.update(raw_rows=rows, inter_rows=converted["rows"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recbole-repeats", type=int, default=1)
    parser.add_argument("--recbole-max-rows", type=int, default=2_000_000,
                        help="largest raw log RecBole's path is run on (it needs ~1.9 kB per interaction)")
    parser.add_argument("--startup-rows", type=int, default=20_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="item popularity exponent")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lean", "bench_scale"))
    parser.add_argument("--negatives", type=int, default=8192, help="sampled-softmax negatives K of the train phase")
    parser.add_argument("--full-softmax-max-rows", type=int, default=10_000_000,
                        help="largest raw log the full-softmax train phase runs on (its logits are [2048, n_items])")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training batches (after the warm-up)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="evaluate only the first N test batches and extrapolate (0: all)")
    parser.add_argument("--phases", nargs="+", default=["convert", "load_prepare", "train", "evaluate"],
                        choices=["convert", "load_prepare", "train", "evaluate"],
                        help="phases to time (the log is converted in any case)")
    parser.add_argument("--eval-paths", nargs="+", default=["plugin", "previous"], choices=["plugin", "previous"],
                        help="evaluation paths timed side by side: the plugin's, and its previous one "
                             "(RecBole's scoring and collector in budget-sized chunks)")
    parser.add_argument("--eval-repeats", type=int, default=1, help="alternating runs of each evaluation path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in train/evaluate")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return
    if max(args.rows) > 10_000_000 and os.environ.get("BENCH_SCALE_BIG") != "1":
        raise SystemExit("more than 10M rows: set BENCH_SCALE_BIG=1 (needs tens of GB of disk and minutes)")

    _, tiny = prepare(Path(args.cache), args.startup_rows, args.zipf)
    startup = {"lean": 0, "recbole": 0}
    if "load_prepare" in args.phases:
        run_phase("convert", 1, raw=str(prepare(Path(args.cache), args.startup_rows, args.zipf)[0]), out=str(tiny))
        startup = {path: run_phase("load_prepare", args.repeats, out=str(tiny), sequence_data=path)["peak_rss"]
                   for path in ("lean", "recbole")}
    results = []
    for rows in args.rows:
        print(f"... {rows:,} rows", file=sys.stderr)
        results += measure(rows, args, startup)

    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians over the runs listed; "
          f"start-up (same phase, {args.startup_rows:,}-row log): lean {startup['lean'] / 2**30:.2f} GB, "
          f"recbole {startup['recbole'] / 2**30:.2f} GB")
    print(f"| {'raw rows':>11} | {'.inter rows':>11} | {'phase':<12} | {'path':<7} | {'median s':>8} | "
          f"{'peak RSS':>9} | {'B/inter':>7} | runs (s)")
    print(f"|{'-' * 13}|{'-' * 13}|{'-' * 14}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 10}")
    for r in results:
        per = f"{r['bytes_per_interaction']:7.0f}" if "bytes_per_interaction" in r else " " * 7
        print(f"| {r['raw_rows']:>11,} | {r['inter_rows']:>11,} | {r['phase']:<12} | {r['path']:<7} | "
              f"{r['seconds']:8.1f} | {r['peak_rss'] / 2**30:6.2f} GB | {per} | {r['all_seconds']}")
    for r in results:  # what the training and evaluation phases measured, beside their wall time
        if r["phase"] == "train":
            print(f"train {r['path']:>6} at {r['raw_rows']:,} rows ({r['items']:,} items): {r['rows_per_s']:,.0f} rows/s "
                  f"over {r['steps']} batches; an epoch of {r['train_examples']:,} examples extrapolates to "
                  f"{r['epoch_s_extrapolated'] / 60:,.1f} min")
        if r["phase"] == "evaluate":
            part = (f"{r['evaluated_batches']} of {r['batches']} test batches in {r['eval_s']:.1f} s, "
                    f"all extrapolated to {r['eval_s_extrapolated'] / 60:,.1f} min"
                    if r["evaluated_batches"] < r["batches"] else f"all {r['batches']} test batches: {r['eval_s']:.1f} s")
            print(f"evaluate ({r['eval_path']}) at {r['raw_rows']:,} rows ({r['items']:,} items, budget "
                  f"{r['budget_mb']} MB): {part}; NDCG@10 {r['ndcg']:.6f}")
    for rows in sorted({r["raw_rows"] for r in results}):
        evals = {r["eval_path"]: r for r in results if r["phase"] == "evaluate" and r["raw_rows"] == rows}
        if {"plugin", "previous"} <= evals.keys():
            print(f"full-sort evaluation at {rows:,} rows: the plugin's path is "
                  f"{evals['previous']['eval_s'] / evals['plugin']['eval_s']:.2f}x the previous one's rate "
                  f"(medians of {len(evals['plugin']['all_seconds'])} alternating runs; same NDCG: "
                  f"{evals['plugin']['ndcg'] == evals['previous']['ndcg']})")
    for rows in sorted({r["raw_rows"] for r in results}):
        rates = {r["path"]: r["rows_per_s"] for r in results if r["phase"] == "train" and r["raw_rows"] == rows}
        if "full" in rates and len(rates) > 1:
            sampled = next(v for k, v in rates.items() if k != "full")
            print(f"sampled / full softmax training throughput at {rows:,} rows: {sampled / rates['full']:.2f}x")
    for path in ("lean", "recbole"):  # the slope between sizes: start-up of any kind cancels out
        sized = sorted((r["inter_rows"], r["peak_rss"]) for r in results
                       if r["phase"] == "load_prepare" and r["path"] == path)
        if len(sized) >= 2:
            (n0, m0), (n1, m1) = sized[0], sized[-1]
            print(f"{path}: marginal peak RSS {(m1 - m0) / (n1 - n0):.0f} bytes per interaction "
                  f"between {n0:,} and {n1:,} rows")
    skipped = [rows for rows in args.rows if rows > args.recbole_max_rows]
    if skipped:
        print(f"(RecBole's path not run above {args.recbole_max_rows:,} raw rows: {skipped})")
    if args.json:
        Path(args.json).write_text(json.dumps({"startup": startup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
