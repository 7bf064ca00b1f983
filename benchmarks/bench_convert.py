"""Converter and loader speed / memory on a UserBehavior-shaped log.

    python benchmarks/bench_convert.py [--rows 10000000] [--repeats 3] [--cache DIR] [--only-cli]

Generates (once, cached) a Tianchi UserBehavior-shaped csv: users in file order as in the
real log, ~1M users, items drawn from a Zipf(1)-like law over ~4M ids, 89% page views, 0.2%
of rows outside the official window. Every contender runs in its own subprocess; the table
reports the median wall time over ``--repeats`` runs (slow baselines: ``--slow-repeats``),
rows/s, the child's peak RSS and, for the converter, the peak RSS of a child that only
imports the package (``import recbole_popprior`` loads torch and RecBole).
The ``CLI`` rows run ``python -m recbole_popprior.convert`` itself, which skips torch and
RecBole: their time is the summary's ``seconds`` (start-up excluded), their RSS the child's
``ru_maxrss`` from ``os.wait4``. ``--only-cli`` runs just those (with and without
``--sample-users 0.1``). Goals (2 cores): converter >= 4M rows/s and <= 1 GB without dedup;
dedup + 5-core <= 4 GB extrapolated to 100M rows; loader >= 4M rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
T0, T1 = 1511539200, 1512316799


def generate(path: Path, rows: int, seed: int = 0, chunk: int = 2_000_000) -> Path:
    """Write a UserBehavior-shaped csv with numpy + pyarrow, in chunks."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if path.exists() and path.stat().st_size > 0:
        return path
    rng = np.random.default_rng(seed)
    n_users, n_items = min(1_000_000, max(10, rows // 10)), min(4_000_000, max(100, rows * 2 // 5))
    names = np.array(["pv", "buy", "cart", "fav"])
    tmp = path.with_suffix(".tmp")
    user = 1
    with open(tmp, "wb") as handle:
        for start in range(0, rows, chunk):
            m = min(chunk, rows - start)
            # users in file order, ~rows/n_users rows each
            per_user = rng.geometric(n_users / rows, size=m)
            users = np.repeat(np.arange(user, user + m), per_user)[:m]
            user = int(users[-1]) + 1
            rank = np.floor(np.exp(rng.random(m) * np.log(n_items))).astype(np.int64)  # Zipf(1)-like
            items = (rank * 2654435761) % n_items + 1
            cats = items % 9439 + 1
            beh = names[rng.choice(4, size=m, p=[0.894, 0.021, 0.056, 0.029])]
            ts = rng.integers(T0, T1 + 1, size=m)
            outside = rng.random(m) < 0.002
            ts[outside] = rng.choice([0, T0 - 3600, T1 + 3600, 2147483647], size=int(outside.sum()))
            table = pa.table({"u": users, "i": items, "c": cats, "b": beh, "t": ts})
            buf = pa.BufferOutputStream()
            pcsv.write_csv(table, buf, pcsv.WriteOptions(include_header=False, quoting_style="none"))
            handle.write(buf.getvalue().to_pybytes())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- contenders

_CONVERT = """
import sys, time, json, resource
from recbole_popprior.converters.pipeline import convert
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c, t = cpu(), time.perf_counter()
s = convert("tianchi", sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c, "rows_read": s["rows_read"],
                  "rows_kept": s["rows_kept"], "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_IMPORT_ONLY = """
import json, resource
import recbole_popprior.converters.pipeline
print(json.dumps({"seconds": 0.0, "cpu": 0.0, "rows_read": 0, "rows_kept": 0,
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_PURE_PYTHON = """
import sys, time, json, resource
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c0, t = cpu(), time.perf_counter()
T0, T1 = 1511539200, 1512316799
rows, read = [], 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line_no, line in enumerate(f):
        read += 1
        u, i, c, b, ts = line.rstrip("\\n").split(",")
        ts = int(ts)
        if b == "pv" and T0 <= ts <= T1:
            rows.append((int(u), ts, line_no, int(i), int(c)))
rows.sort()
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.write("user_id:token\\titem_id:token\\ttimestamp:float\\tbehavior_type:token\\tcategory_id:token\\n")
    out.writelines(f"{u}\\t{i}\\t{ts}\\tpv\\t{c}\\n" for u, ts, _, i, c in rows)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c0, "rows_read": read, "rows_kept": len(rows),
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_LOADER = """
import sys, time, json, resource
import recbole_popprior
from recbole.data.dataset import Dataset
from recbole.utils import FeatureSource
from recbole_popprior.config import Config
from recbole_popprior.data.fast_loader import FastLoadMixin
config = Config(model="SASRec", dataset="tianchi", config_dict={"data_path": sys.argv[2], "gpu_id": "", "state": "ERROR"})
cls = type("Dataset", (FastLoadMixin, Dataset), {}) if sys.argv[1] == "fast" else Dataset
ds = cls.__new__(cls)
ds.config, ds.logger = config, __import__("logging").getLogger()
ds.field2type, ds.field2source, ds.field2seqlen, ds.field2bucketnum = {}, {}, {}, {}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c, t = cpu(), time.perf_counter()
df = ds._load_feat(sys.argv[3], FeatureSource.INTERACTION)
seconds, cpu_s = time.perf_counter() - t, cpu() - c
print(json.dumps({"seconds": seconds, "cpu": cpu_s, "rows_read": len(df), "rows_kept": len(df), "rss_before_kb": before,
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run a snippet in a fresh interpreter; its json line (with its own peak RSS) plus wall time."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"contender failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = result["rss_kb"] / 1024  # ru_maxrss of the child itself (Linux: KiB)
    result["wall"] = wall
    return result


def run_cli(src: str, out: str, *options: str) -> dict:
    """``python -m recbole_popprior.convert tianchi`` in a child: its summary, peak RSS and wall time."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "recbole_popprior.convert", "tianchi", "--input", src,
                             "--output", out, "--no-progress", *options], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (subprocess.wait would lose it)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"converter failed:\n{proc.stderr.read().decode()[-2000:]}")
    summary = json.loads((Path(out) / "tianchi" / "tianchi.summary.json").read_text())
    return {"seconds": summary["seconds"], "cpu": usage.ru_utime + usage.ru_stime, "rows_read": summary["rows_read"],
            "rows_kept": summary["rows_kept"], "rss_kb": usage.ru_maxrss, "peak_rss_mb": usage.ru_maxrss / 1024,
            "wall": wall}


def median_run(label: str, repeats: int, code: str, *args: str) -> dict:
    runs = [run_cli(*args) if code == "cli" else run_child(code, *args) for _ in range(repeats)]
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    rss = max(r["peak_rss_mb"] for r in runs)
    out = {"label": label, "seconds": seconds, "cpu": cpu, "rows_read": runs[0]["rows_read"], "rows_kept": runs[0]["rows_kept"],
           "peak_rss_mb": rss, "repeats": repeats, "all_seconds": [round(r["seconds"], 2) for r in runs]}
    print(f"  {label}: {out['all_seconds']} s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="runs of the pure-Python and RecBole baselines")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "recbole_popprior_bench"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--only-cli", action="store_true", help="only the command-line rows (with --sample-users)")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    src = generate(cache / f"UserBehavior_{args.rows}.csv", args.rows)
    print(f"input {src} ({src.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.1f} s to make or find)",
          file=sys.stderr)
    out = cache / "out"
    cli = [median_run("CLI, no dedup", args.repeats, "cli", str(src), str(out / "d"), "--no-dedup"),
           median_run("CLI, no dedup, --sample-users 0.1", args.repeats, "cli", str(src), str(out / "e"), "--no-dedup",
                      "--sample-users", "0.1"),
           median_run("CLI, dedup + 5-core, --sample-users 0.1", args.repeats, "cli", str(src), str(out / "f"),
                      "--k-core", "5", "--sample-users", "0.1")]
    if args.only_cli:
        print(f"\nUserBehavior-shaped input: {args.rows:,} rows; {os.cpu_count()} CPUs; load average "
              f"{os.getloadavg()[0]:.1f}\n")
        _table(cli, cli[0]["seconds"], "ratio: CLI, no dedup / this row, by median seconds (start-up excluded)")
        if args.json:
            Path(args.json).write_text(json.dumps(cli, indent=2))
        return
    results = [
        median_run("import only (baseline RSS)", 1, _IMPORT_ONLY),
        median_run("plugin converter, no dedup", args.repeats, _CONVERT, str(src), str(out / "a"), '{"dedup": false}'),
        median_run("plugin converter, dedup + 5-core", args.repeats, _CONVERT, str(src), str(out / "b"),
                   '{"dedup": true, "k_core": 5}'),
        median_run("pure Python line by line (no dedup)", args.slow_repeats, _PURE_PYTHON, str(src),
                   str(out / "py.inter")),
    ]
    small = generate(cache / f"UserBehavior_{args.rows // 4}.csv", args.rows // 4)
    quarter = median_run("plugin converter, dedup + 5-core, rows/4", 1, _CONVERT, str(small), str(out / "c"),
                         '{"dedup": true, "k_core": 5}')
    inter = out / "a" / "tianchi" / "tianchi.inter"
    same = (out / "py.inter").read_bytes() == inter.read_bytes()
    results += [
        median_run("RecBole _load_feat (python engine)", args.slow_repeats, _LOADER, "recbole", str(out / "a"), str(inter)),
        median_run("plugin FastLoadMixin._load_feat", args.repeats, _LOADER, "fast", str(out / "a"), str(inter)),
    ]
    rows = args.rows
    print(f"\nUserBehavior-shaped input: {rows:,} rows; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}; pure-Python output identical to the converter's: {same}\n")
    py = results[3]["seconds"]
    recbole = results[4]["seconds"]
    _table(results[1:4] + cli, py, "ratio: converters vs the pure-Python baseline, by median seconds")
    _table(results[4:], recbole, "ratio: loaders vs RecBole's loader, by median seconds")
    print("(CPU s: user+sys seconds of the measured section, all threads; CLI rows: of the whole child)")
    base_rss = results[0]["peak_rss_mb"]
    dd = results[2]
    slope = (dd["peak_rss_mb"] - quarter["peak_rss_mb"]) / (rows - rows // 4)  # MB per row
    print(f"import-only peak RSS: {base_rss / 1024:.2f} GB (torch + recbole, imported through the package)")
    print(f"dedup + 5-core peak RSS: {quarter['peak_rss_mb'] / 1024:.2f} GB at {rows // 4:,} rows, "
          f"{dd['peak_rss_mb'] / 1024:.2f} GB at {rows:,} rows -> {(dd['peak_rss_mb'] + slope * (1e8 - rows)) / 1024:.2f}"
          f" GB extrapolated linearly to 100M rows")
    if args.json:
        Path(args.json).write_text(json.dumps(results + [quarter], indent=2))


def _table(rows: list[dict], reference_seconds: float, note: str) -> None:
    print(f"| {'contender':<42} | {'median s':>8} | {'rows/s':>9} | {'CPU s':>6} | {'peak RSS':>9} | {'ratio':>6} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 8}|")
    for r in rows:
        rate = r["rows_read"] / r["seconds"]
        print(f"| {r['label']:<42} | {r['seconds']:8.2f} | {rate / 1e6:7.2f} M | {r['cpu']:6.2f} "
              f"| {r['peak_rss_mb'] / 1024:6.2f} GB | {reference_seconds / r['seconds']:5.2f}x |")
    print(f"({note})\n")


if __name__ == "__main__":
    main()
