"""The allocator setting (``malloc_tuning``, docs/DESIGN.md §11.1) on the converter.

    python benchmarks/bench_convert_malloc.py [--rows 10000000] [--repeats 3] [--dedup]

The same conversion in fresh child processes, with glibc's default ``malloc`` and with
:func:`recbole_popprior.runtime.tune_allocator` applied first, in alternating rounds; prints the
median wall seconds of ``convert`` (start-up excluded), the ratio and each arm's peak RSS.
The data are ``bench_convert.py``'s UserBehavior-shaped log (generated once, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_convert import generate  # noqa: E402

CHILD = """
import json, resource, sys, time
if sys.argv[1] == "tuned":
    from recbole_popprior.runtime import tune_allocator
    assert tune_allocator(), "mallopt unavailable"
from recbole_popprior.converters.pipeline import convert
t = time.perf_counter()
convert("tianchi", sys.argv[2], sys.argv[3], dedup=sys.argv[4] == "1", progress=False)
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dedup", action="store_true", help="also deduplicate (the converter's heavier path)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "recbole_popprior_bench"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"UserBehavior-{args.rows}.csv"
    if not src.exists():
        generate(src, args.rows)
    results: dict[str, list[dict]] = {"default": [], "tuned": []}
    with tempfile.TemporaryDirectory(dir=cache) as work:
        for _ in range(args.repeats):
            for arm in ("default", "tuned"):
                out = Path(work) / arm
                done = subprocess.run([sys.executable, "-c", CHILD, arm, str(src), str(out), "1" if args.dedup else "0"],
                                      capture_output=True, text=True, cwd=ROOT, check=True)
                results[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
                subprocess.run(["rm", "-rf", str(out)], check=True)
    med = {arm: statistics.median(r["s"] for r in runs) for arm, runs in results.items()}
    print(f"converter, {args.rows:,} rows, dedup={args.dedup}, {args.repeats} alternating rounds, load {os.getloadavg()[0]:.1f}")
    for arm, runs in results.items():
        times = ", ".join(f"{r['s']:.2f}" for r in runs)
        print(f"  {arm:8s} median {med[arm]:.2f} s  (runs {times})  peak RSS {max(r['rss_mb'] for r in runs):.0f} MB")
    print(f"  default / tuned: {med['default'] / med['tuned']:.2f}x")


if __name__ == "__main__":
    main()
