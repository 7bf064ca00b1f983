"""What a quirky ``.inter`` costs the lean reader (issue 19, 1; docs/DESIGN.md §5.3).

RecBole's own ``test.inter`` ends with a row that has one field more than its header. The lean
reader reads a regular file in one pyarrow pass; a file with such a row fails that pass, is
measured against pandas' rules (``row_shapes.scan_rows``, one vectorised pass over the bytes) and
is read again through ``Normalised``. This times both files, side by side and interleaved, with
the reading process's peak RSS, and prints the median ratio (quirky / regular).

    python benchmarks/bench_quirky_inter.py --quick        # 1M rows, 3 repeats
    python benchmarks/bench_quirky_inter.py --rows 10000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write(path: Path, rows: int, quirky: bool, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, rows // 50 + 2), 50)[:rows]
    items = np.minimum(rng.zipf(1.2, size=rows), 200_000)
    times = 1_500_000_000 + np.arange(rows)
    body = "\n".join(f"{u}\t{i}\t{t}" for u, i, t in zip(users.tolist(), items.tolist(), times.tolist()))
    tail = "\n130\t121\t876250746\t1" if quirky else "\n"  # RecBole's test.inter: one more field, no newline
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + body + tail, encoding="utf-8")


CHILD = """
import sys, time
from recbole_popprior.data.inter_codes import read_inter_codes
start = time.perf_counter()
codes = read_inter_codes(sys.argv[1], None, None, "\\t", "utf-8")
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(seconds, peak / 1024, len(codes), codes.shapes is not None)
"""


def measure(path: Path) -> tuple[float, float, int, bool]:
    """One read in a fresh process: (seconds, the process's peak RSS in MB, rows, normalised?)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds, mb, rows, normalised = out.stdout.split()
    return float(seconds), float(mb), int(rows), normalised == "True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1M rows, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 1_000_000, 3
    with tempfile.TemporaryDirectory() as folder:
        regular, quirky = Path(folder) / "regular.inter", Path(folder) / "quirky.inter"
        write(regular, args.rows, False)
        write(quirky, args.rows, True)
        times: dict[str, list[float]] = {"regular": [], "quirky": []}
        memory: dict[str, list[float]] = {"regular": [], "quirky": []}
        for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
            for name, path in (("regular", regular), ("quirky", quirky)):
                seconds, mb, rows, normalised = measure(path)
                assert normalised == (name == "quirky") and rows == args.rows + (name == "quirky")
                times[name].append(seconds)
                memory[name].append(mb)
    for name in times:
        print(f"{name:8s} {args.rows:,} rows: median {statistics.median(times[name]):.2f} s, "
              f"peak RSS {statistics.median(memory[name]):.0f} MB (the process, imports included)")
    ratios = [q / r for q, r in zip(times["quirky"], times["regular"])]
    print(f"quirky / regular: time {statistics.median(ratios):.2f}x (median of {args.repeats} interleaved pairs), "
          f"memory {statistics.median(memory['quirky']) / statistics.median(memory['regular']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
