"""One epoch plus full evaluation on a UserBehavior-shaped log, end to end, with the speed preset (docs/DESIGN.md §11).

    python benchmarks/bench_epoch.py [--rows 10000000] [--cache DIR] [--output DIR]
    python benchmarks/bench_epoch.py --train-batches 30 --eval-batches 3      # a short version, extrapolated

The log is ``bench_scale.py``'s generator at ``--rows`` raw rows (10M: about 8.9M page views after
5-core, 96k items, 100k users), converted with the plugin's converter (both cached under ``--cache``).

- Without ``--train-batches``, the README's command runs as it is (one epoch, then RecBole's
  validation and the test evaluation, every batch), under ``/usr/bin/time -v``:

      python run_recbole_popprior.py --model=SASRec --dataset=tianchi --data_path=<converted>
          --config_files=properties/fast.yaml --softmax_negatives=8192 --epochs=1 --metrics=[...,PopEnergy]
          --show_progress=False

  and its wall time, peak RSS (``Maximum resident set size``), fit time and the test metrics with the
  energy metrics (``results.json``) are printed.
- With ``--train-batches N`` (and ``--eval-batches M``), the same config is built in this process: RecBole's
  own ``_train_epoch`` runs on the first N batches (the first two are the warm-up), the test evaluation on
  the first M batches, and both are extrapolated to the whole epoch and the whole evaluation (said so in
  the output). The energy metrics of a barely trained model on M batches are printed as what they are.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ["Recall", "MRR", "NDCG", "Hit", "PopEnergy"]


def prepare(rows: int, cache: Path) -> Path:
    """The generated raw log and its conversion (each in a child process, so this one stays small)."""
    raw = cache / f"UserBehavior_{rows}.csv"
    out = cache / f"converted_{rows}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not raw.is_file():
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_scale; " \
               f"bench_scale.generate(__import__('pathlib').Path({str(raw)!r}), {rows})"
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    if not (out / "tianchi" / "tianchi.inter").is_file():
        subprocess.run([sys.executable, "-m", "recbole_popprior.convert", "tianchi", "--input", str(raw),
                        "--output", str(out), "--no-progress"], check=True, env=env, cwd=ROOT)
    return out


def command(data_path: Path, output: Path, preset: str, negatives: str) -> list[str]:
    """The README's command for the 10%-user subset, with the preset, one epoch and the energy metrics."""
    return [sys.executable, "run_recbole_popprior.py", "--model=SASRec", "--dataset=tianchi",
            f"--data_path={data_path}", f"--config_files={preset}", f"--softmax_negatives={negatives}", "--epochs=1",
            f"--metrics={METRICS!r}".replace(" ", ""), "--show_progress=False", f"--output={output}"]


def parse_setting(text: str) -> tuple[str, object]:
    """``key=value`` as the command line parses it (a Python literal, else the string)."""
    from recbole_popprior.config import parse_literal

    key, _, value = text.partition("=")
    return key, parse_literal(value)


def run_full(args, data_path: Path) -> int:
    output = Path(args.output)
    cmd = command(data_path, output, args.preset, args.negatives) + [f"--{kv}" for kv in args.set]
    print("command:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    runs = sorted(output.glob("SASRec-tianchi-*/results.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(runs[-1].read_text())
    print(f"wall time {wall / 60:.1f} min (fit, i.e. the epoch and its validation: {result['fit_seconds'] / 60:.1f} min); "
          f"peak RSS {int(peak.group(1)) / 2**20:.2f} GB" if peak else "")
    print("test:", json.dumps(result["test_result"], indent=1))
    return 0


@contextlib.contextmanager
def first(loader, n: int):
    """Within the block the loader yields its first ``n`` batches only; RecBole dispatches on the loader's
    class, so the class stays (a subclass), and it is put back afterwards."""
    original = loader.__class__

    class First(original):
        def __iter__(self):
            return itertools.islice(super().__iter__(), n)

    loader.__class__ = First
    try:
        yield loader
    finally:
        loader.__class__ = original


def peak_rss() -> int:
    """This process's peak RSS in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_short(args, data_path: Path) -> int:
    import recbole_popprior  # noqa: F401  (first: OpenMP's wait policy)
    import torch

    from recbole_popprior.quick_start import build_config, build_pipeline

    start = time.perf_counter()
    config = build_config("SASRec", "tianchi", config_file_list=[args.preset], config_dict={
        "data_path": str(data_path), "epochs": 1, "metrics": METRICS, "show_progress": False,
        "softmax_negatives": args.negatives if args.negatives == "auto" else int(args.negatives),
        **dict(parse_setting(kv) for kv in args.set),
        "output": str(args.output), "state": "WARNING"})
    pipe = build_pipeline(config, log=False)
    setup = time.perf_counter() - start
    train, test, trainer = pipe.train_data, pipe.test_data, pipe.trainer

    warmup = 2
    batches, examples = len(train), len(train.dataset)
    n = min(args.train_batches, batches)
    with first(train, warmup):
        trainer._train_epoch(train, 0)
    tick = time.perf_counter()
    with first(train, n - warmup):
        trainer._train_epoch(train, 0)
    per_batch = (time.perf_counter() - tick) / (n - warmup)
    train_peak = peak_rss()
    eval_batches = len(test)
    m = min(args.eval_batches or eval_batches, eval_batches)
    tick = time.perf_counter()
    with torch.no_grad(), first(test, m):
        result = trainer.evaluate(test, load_best_model=False)
    eval_s = time.perf_counter() - tick
    epoch_s = per_batch * batches
    full_eval_s = eval_s * eval_batches / m
    print(f"{examples:,} training examples in {batches:,} batches of {config['train_batch_size']}, "
          f"{pipe.model.log_prior.shape[0] - 1:,} items; load + build {setup:.0f} s; objective "
          f"{type(pipe.model.training_objective).__name__}; torch threads {torch.get_num_threads()}")
    print(f"train: {n - warmup} batches after {warmup} of warm-up, {per_batch:.2f} s per batch "
          f"({config['train_batch_size'] / per_batch:,.0f} rows/s); one epoch extrapolates to {epoch_s / 60:.1f} min")
    print(f"test evaluation: {m} of {eval_batches} batches in {eval_s:.1f} s; all extrapolate to "
          f"{full_eval_s / 60:.1f} min (the README's command evaluates twice: validation after the epoch, then test)")
    print(f"peak RSS after training {train_peak / 2**30:.2f} GB")
    print(f"end to end (load + epoch + two evaluations) extrapolates to {(setup + epoch_s + 2 * full_eval_s) / 60:.1f} min; "
          f"peak RSS so far {peak_rss() / 2**30:.2f} GB")
    print("metrics of the partial evaluation (a model after", n, "batches):",
          json.dumps({k: round(float(v), 4) for k, v in result.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lean", "bench_scale"))
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "lean", "bench_epoch"))
    parser.add_argument("--preset", default="properties/fast.yaml")
    parser.add_argument("--negatives", default="8192",
                        help="softmax_negatives: 8192 as the README's subset command, or auto (the full softmax at 96k items)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override (for example malloc_tuning=False), repeatable")
    parser.add_argument("--train-batches", type=int, default=0, help="a short version: time the first N batches")
    parser.add_argument("--eval-batches", type=int, default=0, help="with --train-batches: evaluate the first M")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    data_path = prepare(args.rows, Path(args.cache))
    if args.train_batches:
        if args.train_batches < 3:
            parser.error("--train-batches must be at least 3 (two are the warm-up)")
        return run_short(args, data_path)
    return run_full(args, data_path)


if __name__ == "__main__":
    raise SystemExit(main())
