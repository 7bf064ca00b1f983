"""How long ``--help`` takes, side by side with importing what the commands run (torch, RecBole).

Each round runs, in fresh processes and interleaved: ``recbole-popprior --help`` (through
``run_recbole_popprior.py``), ``--beta-sweep --help``, the converter's ``--help``, and
``python -c "import recbole_popprior.commands"`` (what a command loads after parsing: the cost
that ``--help`` used to pay first). Prints the median wall time of each and its ratio to the
import; the goal is under a second for every ``--help``.

    python benchmarks/bench_cli_help.py            # 7 rounds
    python benchmarks/bench_cli_help.py --quick    # 3 rounds (well under 2 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "--help": [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--help"],
    "--beta-sweep --help": [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--beta-sweep", "--help"],
    "convert --help": [sys.executable, "-m", "recbole_popprior.convert", "--help"],
    "import the commands (torch, RecBole)": [sys.executable, "-c", "import recbole_popprior.commands"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=300)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, command in VARIANTS.items():
            times[name].append(wall(command))
    reference = statistics.median(times["import the commands (torch, RecBole)"])
    print(f"{'what':40s} {'median s':>9s} {'/ import':>9s}   ({rounds} rounds, interleaved)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:40s} {median:9.3f} {median / reference:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
