"""Training throughput of prior-separated SASRec: full softmax vs sampled softmax (docs/DESIGN.md §6).

Generates a sequential dataset with about 72k items (the size of the 10M-row Tianchi sample after
5-core; Zipf popularity, every item present at least once), builds SASRec (hidden 64, 2 layers,
MAX_ITEM_LIST_LENGTH 50, batch 2048) twice with the same seed, once with the full softmax and once
with ``softmax_negatives: 8192`` and the popularity sampler, and times full training steps
(forward, backward, Adam) on the same pre-collated batches, interleaved batch by batch
(A B B A ...) after a warm-up. Prints rows/s of each (median over the batches), the ratio
sampled / full (goal: >= 5), and the peak RSS after each arm's warm-up (the sampled arm runs
first, so its figure is its own peak; the full arm's is the process peak).

It also times the loss head alone, the part sampled softmax replaces: from the contexts ``H``
(a leaf, the encoder left out) to the loss and its backward, full softmax through the model's
own ``loss_fct`` vs the sampled objective. The whole-step ratio cannot exceed
``step(full) / encoder`` however fast the head is (Amdahl), so both ratios are printed.

    python benchmarks/bench_sampled_softmax.py [--items=72000] [--users=6000] [--length=30]
        [--negatives=8192] [--batches=4] [--threads=1] [--workdir=/tmp/bench_sampled_softmax]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import recbole_popprior  # noqa: E402,F401  (compat shims)
from recbole.utils import init_seed  # noqa: E402

from recbole_popprior.config import Config  # noqa: E402
from recbole_popprior.data import create_dataset, data_preparation  # noqa: E402
from recbole_popprior.model.objective import TrainingBatch  # noqa: E402

SETTINGS = {"hidden_size": 64, "embedding_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
            "MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": 2048, "state": "WARNING", "show_progress": False,
            "gpu_id": "", "seed": 2020, "reproducibility": True, "prior_tau": 1.0,
            "softmax_sampler": "popularity"}


def write_dataset(folder: Path, items: int, users: int, length: int, seed: int = 0) -> Path:
    """``bench.inter``: ``users`` sequences of ``length`` Zipf(1) items; each item placed once at a
    random position first, so that the item table really has ``items`` rows."""
    rng = np.random.default_rng(seed)
    rows = users * length
    if rows < items:
        raise SystemExit(f"--users x --length = {rows} rows cannot hold {items} distinct items")
    p = 1.0 / np.arange(1, items + 1)
    seq = rng.choice(items, size=rows, p=p / p.sum()) + 1
    seq[rng.permutation(rows)[:items]] = np.arange(1, items + 1)
    user = np.repeat(np.arange(1, users + 1), length)
    stamp = np.tile(np.arange(length), users) + 1000 * user
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench.inter"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(handle, np.stack([user, seq, stamp], axis=1), fmt="%d", delimiter="\t")
    return path


def _step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    model.calculate_loss(batch).backward()
    optimizer.step()
    return time.perf_counter() - start


def _head_step(model, H: torch.Tensor, targets: torch.Tensor) -> float:
    """Seconds for loss + backward from fixed contexts ``H``: SASRec's full-softmax head, or the objective."""
    start = time.perf_counter()
    H = H.detach().requires_grad_(True)
    E = model.item_embedding.weight
    if model.training_objective is None:
        loss = model.loss_fct(H @ E.T, targets)  # what SASRec.calculate_loss does after forward
    else:
        loss = model.training_objective.loss(model, TrainingBatch(H, E, targets))
    loss.backward()
    return time.perf_counter() - start


def _interleaved(models: dict, step, inputs) -> dict[str, list[float]]:
    """Seconds of ``step(model, ...)`` per input for each model, in A B B A ... order."""
    seconds = {label: [] for label in models}
    labels = list(models)
    for k, args in enumerate(inputs):
        for label in (labels if k % 2 == 0 else labels[::-1]):
            seconds[label].append(step(models[label], *args))
    return seconds


def _report(what: str, seconds: dict[str, list[float]], rows: int) -> None:
    for label in ("full", "sampled"):
        print(f"{what:<5} {label:<8} {rows / statistics.median(seconds[label]):>10.0f} rows/s "
              f"(median of {len(seconds[label])})")
    ratios = [f / s for f, s in zip(seconds["full"], seconds["sampled"])]
    print(f"{what:<5} ratio sampled/full: {statistics.median(ratios):.2f}x (median of per-batch ratios)")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=72000)
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--negatives", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per arm (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/bench_sampled_softmax")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    try:
        write_dataset(workdir / "bench", args.items, args.users, args.length)
        base = {**SETTINGS, "data_path": str(workdir), "checkpoint_dir": str(workdir / "saved")}
        configs = {label: Config(model="SASRec", dataset="bench", config_dict={**base, "softmax_negatives": k})
                   for label, k in (("sampled", args.negatives), ("full", 0))}
        dataset = create_dataset(configs["full"])
        train_data, _, _ = data_preparation(configs["full"], dataset)
        batches = []
        for batch in train_data:
            if len(batch) == SETTINGS["train_batch_size"]:
                batches.append(batch)
            if len(batches) == args.batches + 1:
                break
        print(f"items={dataset.item_num - 1} training rows={len(train_data.dataset)} batch={len(batches[0])} "
              f"negatives={args.negatives} (popularity) threads={torch.get_num_threads()} "
              f"timed batches={len(batches) - 1} per arm", flush=True)
        models, rss = {}, {}
        for label, config in configs.items():  # sampled first: its warm-up peak is its own
            init_seed(2020, True)
            model = config.model_class(config, train_data._dataset)
            model.train()
            models[label] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
            _step(*models[label], batches[0])
            rss[label] = _peak_rss_mb()
        rows = len(batches[0])
        steps = _interleaved(models, lambda pair, batch: _step(*pair, batch), [(b,) for b in batches[1:]])
        _report("step", steps, rows)
        model = models["full"][0]
        with torch.no_grad():
            contexts = [(model.forward(b["item_id_list"], b["item_length"]), b["item_id"]) for b in batches[1:]]
        heads = _interleaved(models, lambda pair, H, y: _head_step(pair[0], H, y), contexts)
        _report("head", heads, rows)
        for label in ("sampled", "full"):
            print(f"peak RSS after the {label} arm's first step: {rss[label]:.0f} MB")
        print("goal: step ratio >= 5")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
