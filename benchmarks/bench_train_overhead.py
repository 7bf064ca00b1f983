"""Training-time overhead of prior separation against RecBole's own model class.

For each model, RecBole's class (A) and the prior-separated class (B) are built with the same
seed and config on the same data, and trained on the same pre-collated batches (data loading,
identical for both, is left out so that only the model's training step is timed). Epochs are
interleaved batch by batch (A B B A ...) within each epoch, so load drift on a shared machine
hits both alike; the script prints the median seconds per epoch of each and the median of the
per-epoch ratios B / A (goal: <= 1.02).

    python benchmarks/bench_train_overhead.py [--quick] [--models=SASRec,GRU4Rec,BERT4Rec,NARM]
        [--repeats=5] [--max-batches=N] [--dataset=ml-100k]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import recbole_popprior  # noqa: E402,F401  (compat shims)
from recbole.utils import init_seed  # noqa: E402

from recbole_popprior.config import Config  # noqa: E402
from recbole_popprior.data import create_dataset, data_preparation  # noqa: E402

SMALL = {"hidden_size": 16, "embedding_size": 16, "inner_size": 32, "MAX_ITEM_LIST_LENGTH": 20,
         "train_batch_size": 512, "n_layers": 1, "n_heads": 1, "state": "WARNING", "show_progress": False,
         "gpu_id": "", "seed": 2020, "reproducibility": True, "fast_loader": False}


def _step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = model.calculate_loss(batch)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _paired_epoch(models: dict, batches) -> dict[str, float]:
    """One epoch of each model, interleaved batch by batch (A B B A ...) so that load drift on
    a shared machine hits both alike; returns the seconds each model spent."""
    spent = {label: 0.0 for label in models}
    labels = list(models)
    for k, batch in enumerate(batches):
        for label in (labels if k % 2 == 0 else labels[::-1]):
            spent[label] += _step(*models[label], batch)
    return spent


def bench_model(name: str, dataset: str, repeats: int, max_batches: int | None,
                extra: dict) -> tuple[float, float, float, float]:
    settings = {**SMALL, **extra}
    plugin_config = Config(model=name, dataset=dataset, config_dict={**settings, "prior_tau": 1.0})
    base_config = Config(model=name, dataset=dataset, config_dict={**settings, "popprior_baseline": True})
    data = create_dataset(plugin_config)
    train_data, _, _ = data_preparation(plugin_config, data)
    for key, value in plugin_config.final_config_dict.items():  # keys RecBole's batch transforms add
        if key not in base_config.final_config_dict:
            base_config[key] = value
    batches = []
    for batch in train_data:
        batches.append(batch)
        if max_batches and len(batches) >= max_batches:
            break
    models = {}
    for label, config in (("recbole", base_config), ("popprior", plugin_config)):
        init_seed(2020, True)
        model = config.model_class(config, train_data._dataset)
        models[label] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    for model, _ in models.values():
        model.train()
    _paired_epoch(models, batches[:2])  # warm-up
    epochs = [_paired_epoch(models, batches) for _ in range(repeats)]
    base = statistics.median(e["recbole"] for e in epochs)
    plugin = statistics.median(e["popprior"] for e in epochs)
    ratio = statistics.median(e["popprior"] / e["recbole"] for e in epochs)
    return base, plugin, ratio, _hook_ms(models["popprior"][0], train_data.batch_size)


def _hook_ms(model, rows: int) -> float:
    """Milliseconds per call of the training hook alone (forward + backward of the prior add)."""
    logits = torch.randn(rows, model.log_prior.shape[0] + model.prior_extra_columns, requires_grad=True)
    start = time.perf_counter()
    for _ in range(50):
        model.add_training_prior(logits).sum().backward()
    hooked = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(50):
        logits.sum().backward()
    plain = time.perf_counter() - start
    return 1000 * (hooked - plain) / 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repeats of 10 batches per model")
    parser.add_argument("--models", default="SASRec,GRU4Rec,BERT4Rec,NARM")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise)")
    args = parser.parse_args(argv)
    repeats, max_batches = (5, 10) if args.quick else (args.repeats, args.max_batches)
    torch.set_num_threads(args.threads)
    print(f"dataset={args.dataset} repeats={repeats} max_batches={max_batches or 'all'} "
          f"threads={torch.get_num_threads()} settings={ {k: SMALL[k] for k in ('hidden_size', 'inner_size', 'MAX_ITEM_LIST_LENGTH', 'train_batch_size')} }")
    print(f"{'model':<10} {'recbole s/epoch':>16} {'popprior s/epoch':>17} {'median ratio':>12} {'hook ms/batch':>14}")
    for name in args.models.split(","):
        base, plugin, ratio, hook = bench_model(name, args.dataset, repeats, max_batches, {})
        batches = max_batches or "all"
        print(f"{name:<10} {base:>16.3f} {plugin:>17.3f} {ratio:>12.3f} {hook:>14.3f}   "
              f"(hook share of a step: {hook / 1000 / (base / (batches if isinstance(batches, int) else 1)):.2%})",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
