"""The tau sweep (docs/DESIGN.md §12): dir_frac, R_dir, NDCG@10 and the known-truth measures against the
prior weight tau, per seed, resumable; and its figure over any number of sweeps.

    # a sweep (rerun the same command to resume it; complete runs are never retrained)
    python benchmarks/tau_sweep.py --model=SASRec --dataset=synthetic --taus=0,0.5,1,1.5,learned --seeds=3 \\
        [--prior-sources=estimate,truth] [--prior-modes=static,windowed] [--compare-tau=1] \\
        [--output=DIR] [--config_files="a.yaml b.yaml"] [--key=value ...]
    # rebuild DIR's report from its saved runs, training nothing
    python benchmarks/tau_sweep.py ... --report-only
    # the figure: one column per sweep
    python benchmarks/tau_sweep.py --plot DIR1/sweep.json DIR2/sweep.json --figure=tau_sweep.png \
        [--titles="first panel|second panel"]
    # a smoke run on tiny synthetic data (< 2 min)
    python benchmarks/tau_sweep.py --quick [--output=DIR]

Every ``--key=value`` that is not one of the options above is a RecBole / plugin config override, as
for ``run_recbole_popprior.py``. ``--compare-tau=T`` also writes ``DIR/compare/``, the report that
``--compare`` writes, from the tau=0 and tau=T runs (no extra training). Bad input: one ``error:``
line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from recbole_popprior.errors import PopPriorError
from recbole_popprior.tau_sweep import run_tau_sweep
from recbole_popprior.tau_sweep_plot import plot_tau_sweep

OPTIONS = {"model": None, "dataset": None, "taus": "0,0.5,1,1.5,learned", "seeds": "3",
           "prior_sources": "estimate", "prior_modes": "static", "compare_tau": None, "output": None,
           "config_files": None, "figure": "tau_sweep.png", "titles": None}
FLAGS = ("report_only", "quick", "plot")

#: --quick: tiny synthetic data and model, one seed (a smoke run of every code path)
QUICK = {"synthetic_users": 200, "synthetic_items": 20, "synthetic_seq_len": 12, "synthetic_pmi_scale": 1.5,
         "hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 5,
         "train_batch_size": 256, "epochs": 2, "energy_permutations": 199, "show_progress": False,
         "state": "WARNING", "gpu_id": ""}


def parse(argv: list[str]) -> tuple[dict, dict, list[str]]:
    """``(options, config overrides, plot files)``."""
    options, overrides, files = dict(OPTIONS), {}, []
    options.update({flag: False for flag in FLAGS})
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            raise SystemExit(0)
        if not arg.startswith("--"):
            if not options["plot"]:
                raise PopPriorError(f"unexpected argument {arg!r}: use --key=value")
            files.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name in FLAGS and not sep:
            options[name] = True
        elif name in OPTIONS and sep:
            options[name] = value
        elif name in OPTIONS or name in FLAGS:
            raise PopPriorError(f"--{key} {'needs a value' if name in OPTIONS else 'takes no value'}")
        elif sep:
            overrides[key] = value
        else:
            raise PopPriorError(f"unknown flag --{key}: config overrides take the form --{key}=value")
    try:
        options["seeds"] = int(options["seeds"])
        options["compare_tau"] = None if options["compare_tau"] is None else float(options["compare_tau"])
    except ValueError:
        raise PopPriorError("--seeds takes an integer and --compare-tau a number") from None
    if options["config_files"]:
        options["config_files"] = options["config_files"].split()
        for path in options["config_files"]:
            if not os.path.isfile(path):
                raise PopPriorError(f"config file not found: {path}")
    return options, overrides, files


def plot(files: list[str], figure: str, titles: str | None = None) -> None:
    if not files:
        raise PopPriorError("--plot needs one or more sweep.json files")
    payloads = []
    for path in files:
        try:
            payloads.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise PopPriorError(f"cannot read the sweep {path}: {exc}") from None
        if "rows" not in payloads[-1]:
            raise PopPriorError(f"{path} is not a tau sweep's sweep.json")
    if any(Path(figure).resolve() == Path(p).resolve() for p in files):
        raise PopPriorError(f"--figure={figure} would overwrite an input")
    names = None if titles is None else [t.strip() for t in titles.split("|")]
    print(plot_tau_sweep(payloads, figure, names))


def main(argv: list[str]) -> int:
    try:
        options, overrides, files = parse(argv)
        if options["plot"]:
            plot(files, options["figure"], options["titles"])
            return 0
        if options["quick"]:
            for key in ("model", "dataset"):
                options[key] = options[key] or {"model": "SASRec", "dataset": "synthetic"}[key]
            options["taus"], options["seeds"] = "0,1,learned", 1
            options["prior_sources"] = "estimate,truth"
            options["output"] = options["output"] or tempfile.mkdtemp(prefix="tau_sweep_quick_")
            # the generated data live with the report, so the same command resumes
            overrides = {**QUICK, "data_path": str(Path(options["output"]) / "data"), **overrides}
        if not options["model"] or not options["dataset"]:
            raise PopPriorError("--model and --dataset are required, e.g. --model=SASRec --dataset=synthetic")
        start = time.perf_counter()
        payload = run_tau_sweep(options["model"], options["dataset"], options["taus"], seeds=options["seeds"],
                                sources=options["prior_sources"], modes=options["prior_modes"],
                                config_file_list=options["config_files"], config_dict=overrides,
                                output=options["output"], compare_tau=options["compare_tau"],
                                train=not options["report_only"])
        print(Path(payload["files"]["md"]).read_text(encoding="utf-8"))
        print(f"tau sweep: {payload['trained_now']} run(s) trained now; {time.perf_counter() - start:.0f} s; "
              f"report in {Path(payload['files']['json']).parent}")
        return 0
    except PopPriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; complete runs are kept, rerun the command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
