# One file on purpose (~700 lines): it is copied to a bare GPU machine and run once; splitting it
# would only add imports to keep in step.
"""One-call GPU check: every model on CUDA, mixed precision, sampled vs full softmax at scale,
full-sort evaluation throughput, DDP over NCCL, and the energy statistics on the device.

How to run it (on a machine with a CUDA GPU, from the root of the repository's working tree)::

    python benchmarks/gpu_check.py --output OUT            # < 8 minutes on one GPU (--deadline 450)
    python benchmarks/gpu_check.py --device=cpu --quick --output OUT   # the CPU dry run (tests use it)

It needs nothing but this working tree and a Python where ``torch`` (a CUDA build) and the
package's dependencies (RecBole 1.2.1, ``setup.cfg``) import: ``pip install -e .`` after installing
the CUDA torch the machine needs, never an unpinned torch over it. The repository root is put on
``sys.path``, so an uninstalled checkout works too. Nothing is downloaded: every dataset is
generated under ``OUT/data``. Without CUDA (and without ``--device=cpu``) it refuses with one line
and exit status 2.

It writes ``OUT/gpu_check.json`` (every figure, every error as one line) and ``OUT/gpu_check.md``
(a short summary), atomically, when it finishes or when the deadline stops it. Parts, each with
its own time limit inside one global deadline (a part that runs out is cut short and says so):

1. ``env``: torch, CUDA, the GPU, bf16 support, the number of GPUs.
2. ``zoo``: for every supported model, one training epoch of a tiny generated dataset (a few
   steps through the plugin's trainer) and one full-sort evaluation with the energy metrics, in
   float32, bf16 autocast and fp16 autocast with RecBole's gradient scaler.
3. ``softmax``: SASRec at RecBole's defaults (hidden 64, 2 layers, length 50, batch 2048) on
   generated logs of 96k and 731k items: full vs sampled softmax (K = 8192), AMP off and on,
   interleaved steps, median rows/s and peak GPU memory side by side.
4. ``evaluation``: full-sort evaluation throughput (contexts/s) at 731k items, with the energy
   metrics, in bounded memory (``eval_score_budget_mb``).
5. ``ddp``: the CLI with ``--nproc=<torch.cuda.device_count()>`` over NCCL (one GPU: world size 1,
   which still builds the NCCL group and the DDP wrapper; said so in the report).
6. ``energy``: ``popularity_energy`` and ``matched_reduction`` from device tensors against the
   same tensors on the CPU, and the factor check of TF32 scores (torch.set_float32_matmul_precision("high")).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
#: the GPUs visible at start (RecBole's Config rewrites CUDA_VISIBLE_DEVICES from gpu_id)
VISIBLE_AT_START = os.environ.get("CUDA_VISIBLE_DEVICES")

EXIT_BAD_INPUT = 2
#: share of the global deadline each part may use at most (of what is left when it starts)
PART_LIMITS = {"env": 10, "zoo": 170, "softmax": 150, "evaluation": 50, "ddp": 60, "energy": 30}
QUICK_LIMITS = {"env": 10, "zoo": 60, "softmax": 40, "evaluation": 20, "ddp": 60, "energy": 20}
SCALES = (96_000, 731_000)
QUICK_SCALES = (1_000, 3_000)
#: prepared data of each catalogue size, shared by the softmax and the evaluation parts
_PREPARED: dict[int, tuple] = {}


# ----------------------------------------------------------------------------- time budget
class Deadline:
    """A global deadline, and per-part limits inside it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def part(self, limit: float) -> "Deadline":
        part = Deadline(0)
        part.end = min(self.end, time.monotonic() + limit)
        return part


class OutOfTime(Exception):
    """A part ran out of its time."""


def _check(deadline: Deadline, what: str) -> None:
    if deadline.left() <= 0:
        raise OutOfTime(f"time limit reached before {what}")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- generated data
def write_tiny(root: Path, name: str = "gpucheck_tiny", n_users: int = 40, n_items: int = 30, length: int = 10,
               seed: int = 0) -> Path:
    """A tiny dataset for every model: ``.inter`` (Zipf items), ``.item`` (a token_seq feature) and
    the knowledge-graph files KSR and GRU4RecKG read (``.kg``, ``.link``, ``.ent``, ``.rel``)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    p /= p.sum()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(1, n_users + 1):
        lines += [f"{u}\t{int(i)}\t{1000 * u + t}" for t, i in enumerate(rng.choice(n_items, size=length, p=p) + 1)]
    from recbole_popprior.data.synthetic import feature_and_kg_files

    files = {"inter": lines, **feature_and_kg_files(n_items, rng)}
    for suffix, rows in files.items():
        (folder / f"{name}.{suffix}").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_catalogue(root: Path, n_items: int, seed: int = 1, length: int = 20) -> str:
    """A log over ``n_items`` items (each at least once, then Zipf(1.1)), ``length`` events per user."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    name = f"gpucheck_{n_items // 1000}k"
    path = root / name / f"{name}.inter"
    if path.exists():
        return name
    rng = np.random.default_rng(seed)
    rows = max(3 * n_items, 60_000)
    rows -= rows % length
    ranks = np.minimum(np.floor(np.exp(rng.random(rows - n_items) * np.log(n_items + 1))).astype(np.int64), n_items)
    items = np.concatenate([rng.permutation(n_items) + 1, ranks])
    rng.shuffle(items)
    users = np.repeat(np.arange(1, rows // length + 1), length)
    stamps = np.tile(np.arange(length, dtype=np.float64), rows // length) + users * 100.0
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"u": users, "i": items, "t": stamps})
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(b"user_id:token\titem_id:token\ttimestamp:float\n")
        handle.write(sink.getvalue().to_pybytes())
    os.replace(tmp, path)
    return name


_KG = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "kg": ["head_id", "relation_id", "tail_id"],
                 "link": ["item_id", "entity_id"], "ent": ["ent_id", "ent_emb"], "rel": ["rel_id", "rel_emb"]},
    "additional_feat_suffix": ["ent", "rel"], "alias_of_entity_id": ["ent_id"], "alias_of_relation_id": ["rel_id"],
    "preload_weight": {"ent_id": "ent_emb", "rel_id": "rel_emb"}, "kg_embedding_size": 8,
}
#: per-model settings the tiny data needs (RecBole defaults assume >= 100 items, >= 2 layers)
_EXTRA = {"FEARec": {"n_layers": 2}, "SASRecCPR": {"reranker_CAN_NUM": "10"}, "GRU4RecCPR": {"reranker_CAN_NUM": "10"},
          "GRU4RecKG": _KG, "KSR": _KG}


def base_settings(device: str, data: Path, out: Path, **extra) -> dict[str, Any]:
    settings = {
        "data_path": str(data), "gpu_id": "0" if device == "cuda" else "", "use_gpu": device == "cuda",
        "show_progress": False, "state": "WARNING", "seed": 2020, "reproducibility": False,
        "checkpoint_dir": str(out / "checkpoints"), "output": str(out / "runs"), "epochs": 1,
    }
    settings.update(extra)
    return settings


def tiny_settings(name: str, device: str, data: Path, out: Path, **extra) -> dict[str, Any]:
    settings = base_settings(
        device, data, out, fast_loader=False, MAX_ITEM_LIST_LENGTH=6, train_batch_size=32, eval_batch_size=64,
        hidden_size=8, embedding_size=8, inner_size=16, n_layers=1, n_heads=1,
        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "class"]},
        selected_features=["class"], item_attribute="class", prior_tau=0.8,
        metrics=["Recall", "NDCG", "PopEnergy", "PopPermutation"], topk=[10], valid_metric="NDCG@10",
        energy_permutations=49)
    settings.update(_EXTRA.get(name, {}))
    settings.update(extra)
    return settings


# ----------------------------------------------------------------------------- measuring
def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def peak_reset(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.reset_peak_memory_stats()


def memory_mb(device) -> dict[str, float]:
    import torch

    if getattr(device, "type", device) == "cuda":
        return {"allocated_mb": torch.cuda.memory_allocated() / 2**20,
                "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class _Warnings(logging.Handler):
    """Collects the WARNING lines the plugin and RecBole log while a model runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage()[:300])


@contextmanager
def captured_warnings():
    handler = _Warnings()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


# ----------------------------------------------------------------------------- parts
def part_env(args, deadline: Deadline) -> dict[str, Any]:
    import torch

    import recbole

    info = {"torch": torch.__version__, "recbole": recbole.__version__, "python": sys.version.split()[0],
            "cuda_available": torch.cuda.is_available(), "device": args.device}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(), matmul_precision=torch.get_float32_matmul_precision())
    return info


PRECISIONS = {"fp32": {}, "bf16": {"enable_amp": True, "amp_dtype": "bfloat16"},
              "fp16+scaler": {"enable_amp": True, "amp_dtype": "float16", "enable_scaler": True}}


def _precisions(device: str) -> dict[str, dict]:
    return PRECISIONS if device == "cuda" else {k: v for k, v in PRECISIONS.items() if k != "fp16+scaler"}


def _s3rec_pretrained(device: str, data: Path, out: Path) -> Path:
    from recbole_popprior import checkpoint
    from recbole_popprior.config import Config
    from recbole_popprior.data import create_dataset, data_preparation

    config = Config(model="S3Rec", dataset="gpucheck_tiny", config_dict=tiny_settings(
        "S3Rec", device, data, out, train_stage="pretrain", popprior_baseline=True))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = config.model_class(config, train_data._dataset)
    path = out / "checkpoints" / "S3Rec-pretrained.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_checkpoint(path, model, config=config)
    return path


def part_zoo(args, deadline: Deadline) -> dict[str, Any]:
    """One training epoch (a few steps) and one evaluation of every supported model, per precision."""
    from recbole_popprior.model import supported_models

    data = write_tiny(args.output / "data")
    models = supported_models() if not args.quick else ["SASRec", "BERT4Rec", "GRU4RecCPR"]
    pretrained = _s3rec_pretrained(args.device, data, args.output) if "S3Rec" in models else None
    rows: list[dict[str, Any]] = []
    try:
        _zoo_rows(args, deadline, models, pretrained, data, rows)
        cut = None
    except OutOfTime as exc:
        cut = str(exc)
    failures = [f"{r['model']} {p}: {r[p]['error']}" for r in rows for p in PRECISIONS if p in r and "error" in r[p]]
    failures += [f"{r['model']}: {r['error']}" for r in rows if "error" in r]
    return {"models": rows, "failures": failures, **({"cut_short": cut} if cut else {})}


def _zoo_rows(args, deadline: Deadline, models: list[str], pretrained, data: Path, rows: list) -> None:
    import torch

    from recbole_popprior.config import Config
    from recbole_popprior.data import create_dataset, data_preparation
    from recbole_popprior.trainer import get_trainer

    for name in models:
        _check(deadline, f"model {name}")
        extra = {"train_stage": "finetune", "pre_model_path": str(pretrained)} if name == "S3Rec" else {}
        row: dict[str, Any] = {"model": name}
        try:
            config = Config(model=name, dataset="gpucheck_tiny",
                            config_dict=tiny_settings(name, args.device, data, args.output, **extra))
            train_data, valid_data, _ = data_preparation(config, create_dataset(config))
        except Exception as exc:
            row["error"] = f"data: {one_line(exc)}"
            rows.append(row)
            continue
        for precision, keys in _precisions(args.device).items():
            _check(deadline, f"{name} {precision}")
            row[precision] = _zoo_one(config, keys, train_data, valid_data, get_trainer)
        rows.append(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _zoo_one(config, keys: dict, train_data, valid_data, get_trainer) -> dict[str, Any]:
    import torch

    from recbole.utils import init_seed

    saved = {k: config[k] if k in config else None for k in keys}
    for key, value in keys.items():
        config[key] = value
    out: dict[str, Any] = {}
    try:
        with captured_warnings() as warnings:
            init_seed(2020, False)
            model = config.model_class(config, train_data._dataset).to(config["device"])
            trainer = get_trainer(config)(config, model)
            start = time.perf_counter()
            loss = trainer._train_epoch(train_data, 0)
            sync(config["device"])
            out["train_seconds"] = round(time.perf_counter() - start, 3)
            loss = sum(loss) if isinstance(loss, tuple) else loss
            out["loss"] = float(loss)
            out["finite"] = bool(math.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters()))
            start = time.perf_counter()
            result = trainer.evaluate(valid_data, load_best_model=False)
            sync(config["device"])
            out["eval_seconds"] = round(time.perf_counter() - start, 3)
            out["ndcg@10"] = float(result.get("ndcg@10", float("nan")))
            out["energy_path"] = trainer.eval_collector.last_state.path if trainer.eval_collector.last_state else None
            out["pop_dir_frac"] = float(result.get("pop_dir_frac", float("nan")))
            trainer.tensorboard.close()
        out["warnings"] = sorted(set(warnings))
        if not out["finite"]:
            out["error"] = "non-finite loss or weights"
    except Exception as exc:
        out["error"] = one_line(exc)
        out["where"] = traceback.format_exc().strip().splitlines()[-3:]
    finally:
        for key, value in saved.items():
            config[key] = value
    return out


def _scale_config(args, n_items: int, negatives: int, precision: dict):
    from recbole_popprior.config import Config

    name = write_catalogue(args.output / "data", n_items)
    quick = args.quick
    settings = base_settings(args.device, args.output / "data", args.output,
                             hidden_size=8 if quick else 64, inner_size=16 if quick else 256,
                             n_layers=1 if quick else 2, n_heads=1 if quick else 2,
                             MAX_ITEM_LIST_LENGTH=5 if quick else 50, train_batch_size=64 if quick else 2048,
                             eval_batch_size=256 if quick else 4096, softmax_negatives=negatives,
                             load_col={"inter": ["user_id", "item_id", "timestamp"]},
                             metrics=["Recall", "NDCG", "PopEnergy"], topk=[10], valid_metric="NDCG@10",
                             energy_permutations=0, **precision)
    return Config(model="SASRec", dataset=name, config_dict=settings)


def part_softmax(args, deadline: Deadline) -> dict[str, Any]:
    """Full vs sampled softmax at each scale, AMP off and on: interleaved steps, median rows/s."""
    amp = {"fp32": {}, "amp": {"enable_amp": True, "amp_dtype": "bfloat16"}}
    negatives = 256 if args.quick else 8192
    steps, warmup = (2, 1) if args.quick else (6, 2)
    results: list[dict[str, Any]] = []
    for n_items in (QUICK_SCALES if args.quick else SCALES):
        if deadline.left() <= 0:
            return {"scales": results, "cut_short": f"time limit reached before {n_items} items"}
        results.append(_softmax_scale(args, deadline, n_items, amp, negatives, steps, warmup))
    return {"scales": results}


def _softmax_scale(args, deadline: Deadline, n_items: int, amp: dict, negatives: int, steps: int,
                   warmup: int) -> dict[str, Any]:
    import torch

    from recbole.utils import init_seed

    config = _scale_config(args, n_items, 0, {})
    train_data, _, _ = prepared(config, n_items)
    batches = []
    for batch in train_data:
        batches.append(batch.to(config["device"]))
        if len(batches) == steps + warmup:
            break
    variants = {}
    for loss, k in (("full", 0), ("sampled", negatives)):
        for precision, keys in amp.items():
            config = _scale_config(args, n_items, k, keys)
            init_seed(2020, False)
            model = config.model_class(config, train_data._dataset).to(config["device"])
            variants[f"{loss} {precision}"] = {"model": model, "keys": keys, "times": [], "step_peak_mb": [],
                                               "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
    row: dict[str, Any] = {"n_items": int(train_data._dataset.item_num - 1), "batch": len(batches[0]),
                           "negatives": negatives, "variants": {}}
    try:
        for i, batch in enumerate(batches):  # round-robin: every variant sees the same batches
            _check(deadline, f"step {i} at {n_items} items")
            for name, v in variants.items():
                seconds, peak = _step(v, batch, config["device"])
                if i >= warmup:
                    v["times"].append(seconds)
                    v["step_peak_mb"].append(peak)
    except OutOfTime as exc:
        row["cut_short"] = str(exc)
    except Exception as exc:  # e.g. out of memory for the full softmax: the others still report
        row["error"] = one_line(exc)
    for name, v in variants.items():
        if v["times"]:
            median = statistics.median(v["times"])
            row["variants"][name] = {"rows_per_s": round(len(batches[0]) / median, 1),
                                     "median_step_ms": round(1000 * median, 2), "steps": len(v["times"]),
                                     "step_peak_mb": round(max(v["step_peak_mb"]), 1)}
    full = row["variants"].get("full fp32", {}).get("rows_per_s")
    for name, v in row["variants"].items():
        v["speed_vs_full_fp32"] = round(v["rows_per_s"] / full, 3) if full else None
    del variants, batches
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def prepared(config, n_items: int) -> tuple:
    """``data_preparation`` of the generated catalogue of ``n_items`` (loaded once per run)."""
    from recbole_popprior.data import create_dataset, data_preparation

    if n_items not in _PREPARED:
        _PREPARED.clear()  # one catalogue in memory at a time
        _PREPARED[n_items] = data_preparation(config, create_dataset(config))
    return _PREPARED[n_items]


def _step(variant: dict, batch, device) -> tuple[float, float]:
    import torch

    model, optimizer = variant["model"], variant["optimizer"]
    model.train()
    sync(device)
    peak_reset(device)
    before = torch.cuda.memory_allocated() if getattr(device, "type", device) == "cuda" else 0
    start = time.perf_counter()
    dtype = torch.bfloat16 if variant["keys"] else None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=bool(variant["keys"])):
        loss = model.calculate_loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if getattr(device, "type", device) == "cuda" \
        else memory_mb(device)["peak_rss_mb"]
    return seconds, peak


def part_evaluation(args, deadline: Deadline) -> dict[str, Any]:
    """Full-sort evaluation of the largest catalogue: RecBole's evaluate loop over the first batches."""
    import torch

    from recbole.utils import init_seed

    from recbole_popprior.trainer import get_trainer

    n_items = (QUICK_SCALES if args.quick else SCALES)[-1]
    config = _scale_config(args, n_items, 8 if args.quick else 8192, {})
    train_data, _, test_data = prepared(config, n_items)
    init_seed(2020, False)
    model = config.model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config)(config, model)
    trainer.eval_collector.data_collect(train_data)
    model.eval()
    trainer.tot_item_num = test_data._dataset.item_num
    trainer.item_tensor = test_data._dataset.get_item_feature().to(config["device"])
    contexts, seconds, batches = 0, 0.0, 0
    peak_reset(config["device"])
    with torch.no_grad():
        for batched_data in test_data:  # RecBole's Trainer.evaluate loop, stopped by the time limit
            if deadline.left() <= 0 or batches >= 20:
                break
            sync(config["device"])
            start = time.perf_counter()
            interaction, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batched_data)
            trainer.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
            sync(config["device"])
            seconds += time.perf_counter() - start
            contexts += len(batched_data[0])
            batches += 1
        trainer.eval_collector.model_collect(model)
        result = trainer.evaluator.evaluate(trainer.eval_collector.get_data_struct())
    return {"n_items": int(test_data._dataset.item_num - 1), "contexts": contexts, "batches": batches,
            "contexts_per_s": round(contexts / seconds, 1) if seconds else None,
            "eval_batch_size": int(config["eval_batch_size"]), "eval_score_budget_mb": float(config["eval_score_budget_mb"]),
            "energy_path": trainer.eval_collector.last_state.path if trainer.eval_collector.last_state else None,
            "ndcg@10": float(result.get("ndcg@10", float("nan"))), **memory_mb(config["device"])}


def part_ddp(args, deadline: Deadline) -> dict[str, Any]:
    """The CLI with one process per GPU over NCCL (gloo on the CPU dry run)."""
    import torch

    data = write_tiny(args.output / "data")
    if args.device == "cuda":
        nproc, backend = torch.cuda.device_count(), "nccl"
        note = ("1 GPU: world size 1 (the NCCL process group and the DDP wrapper are built; no traffic "
                "between GPUs is exercised)" if nproc == 1 else f"{nproc} GPUs, one process each")
    else:
        nproc, backend, note = 1, "gloo", "CPU dry run: world size 1 over gloo"
    runs = args.output / "ddp"
    port = 29500 + os.getpid() % 1000
    settings = tiny_settings("SASRec", args.device, data, args.output, output=str(runs), energy_permutations=0,
                             metrics=["Recall", "NDCG", "PopEnergy"])
    overrides = [f"--{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in settings.items()
                 if k not in ("gpu_id", "use_gpu")]
    gpu_ids = ",".join(str(i) for i in range(nproc)) if args.device == "cuda" else ""
    cmd = [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--model=SASRec", "--dataset=gpucheck_tiny",
           f"--nproc={nproc}", f"--ddp_backend={backend}", f"--port={port}", f"--gpu_id={gpu_ids}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if VISIBLE_AT_START is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_AT_START
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.output, env=env, capture_output=True, text=True,
                          timeout=max(5.0, deadline.left()))
    out: dict[str, Any] = {"nproc": nproc, "backend": backend, "note": note, "returncode": proc.returncode,
                           "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return out
    result = json.loads(next(runs.glob("SASRec-gpucheck_tiny-*/results.json")).read_text())
    info = result.get("distributed", {})
    digests = info.get("trained_weights_sha256") or []
    out.update(world_size=info.get("world_size"), ranks_in_step=len(set(digests)) <= 1,
               test_ndcg10=result["test_result"].get("ndcg@10"), pop_contexts=result["test_result"].get("pop_contexts"))
    return out


def part_energy(args, deadline: Deadline) -> dict[str, Any]:
    """The energy statistics from device tensors equal the CPU's; the factor check under TF32."""
    import torch

    from recbole_popprior.evaluator import matched_reduction, popularity_energy
    from recbole_popprior.evaluator.collector import PopPriorCollector

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n, d, m = (2000, 16, 500) if args.quick else (50_000, 64, 4096)
    lp = torch.log_softmax(torch.randn(n, generator=g) * 2, 0)
    lp[0] = -torch.inf
    E = torch.randn(n, d, generator=g)
    H_std = torch.randn(m, d, generator=g) + 3 * E[1:].T.mul(lp[1:].exp()).sum(1)
    H_sep = torch.randn(m, d, generator=g)
    B = 199 if args.quick else 1999
    cpu = {"energy": popularity_energy(H_std, E, lp, permutations=B, seed=0),
           "reduction": matched_reduction((H_std, E), (H_sep, E), permutations=B, seed=0, log_prior=lp)}
    on = {"energy": popularity_energy(H_std.to(device), E.to(device), lp.to(device), permutations=B, seed=0),
          "reduction": matched_reduction((H_std.to(device), E.to(device)), (H_sep.to(device), E.to(device)),
                                         permutations=B, seed=0, log_prior=lp.to(device))}
    gaps = {}
    for part in ("energy", "reduction"):
        for key, value in cpu[part].items():
            if isinstance(value, float) and math.isfinite(value):
                gaps[f"{part}.{key}"] = abs(on[part][key] - value) / max(abs(value), 1e-12)
    out = {"contexts": m, "items": n, "permutations": B, "max_rel_gap_device_vs_cpu": max(gaps.values()),
           "p_value": on["energy"].get("p_value"), "R_dir": on["reduction"]["R_dir"],
           "p_value_dir": on["reduction"].get("p_value_dir")}
    # the factor check with TF32 matmuls (the precision a user may switch on for speed)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        H, T = H_std[:256].to(device), E.to(device)
        out["tf32_factor_check"] = PopPriorCollector._verify_factors(H, T, H @ T.T) or "passed"
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


PARTS: dict[str, Callable[[Any, Deadline], dict[str, Any]]] = {
    "env": part_env, "zoo": part_zoo, "softmax": part_softmax, "evaluation": part_evaluation, "ddp": part_ddp,
    "energy": part_energy}


# ----------------------------------------------------------------------------- report
def summary_markdown(report: dict[str, Any]) -> str:
    env = report["parts"].get("env", {})
    lines = [f"# GPU check ({report['device']}{', quick' if report['quick'] else ''})", "",
             f"{env.get('gpu', 'no GPU')}; torch {env.get('torch')}, CUDA {env.get('cuda')}; "
             f"{report['seconds']:.0f} s of a {report['deadline_s']:.0f} s deadline.", ""]
    for name, part in report["parts"].items():
        status = part.get("status", "?")
        lines.append(f"- **{name}**: {status} ({part.get('seconds', 0):.0f} s)"
                     + (f": {part['error']}" if part.get("error") else ""))
    zoo = report["parts"].get("zoo", {})
    if zoo.get("models"):
        lines += ["", "## Every model: one epoch and one evaluation", "",
                  "| model | " + " | ".join(PRECISIONS) + " |", "|---" * (len(PRECISIONS) + 1) + "|"]
        for row in zoo["models"]:
            cells = []
            for p in PRECISIONS:
                cell = row.get(p)
                warned = f", {len(cell['warnings'])} warning(s)" if cell and cell.get("warnings") else ""
                cells.append("" if cell is None else (f"error: {cell['error']}" if "error" in cell else
                                                      f"ok, {cell.get('energy_path')}{warned}"))
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    soft = report["parts"].get("softmax", {})
    for row in soft.get("scales", []):
        lines += ["", f"## SASRec at {row['n_items']:,} items (batch {row['batch']}, K = {row['negatives']})", "",
                  "| variant | rows/s | vs full fp32 | step peak MB |", "|---|---|---|---|"]
        for name, v in row["variants"].items():
            lines.append(f"| {name} | {v['rows_per_s']} | {v['speed_vs_full_fp32']} | {v['step_peak_mb']} |")
        for key in ("cut_short", "error"):
            if row.get(key):
                lines.append(f"\n{key.replace('_', ' ')}: {row[key]}")
    if soft.get("cut_short"):
        lines.append(f"\nsoftmax part cut short: {soft['cut_short']}")
    ev = report["parts"].get("evaluation", {})
    if ev.get("contexts_per_s"):
        lines += ["", f"Full-sort evaluation at {ev['n_items']:,} items: {ev['contexts_per_s']} contexts/s "
                      f"({ev['contexts']} contexts, energy path {ev['energy_path']})."]
    ddp = report["parts"].get("ddp", {})
    if ddp:
        lines += ["", f"DDP: {ddp.get('note')}; return code {ddp.get('returncode')}, ranks in step: "
                      f"{ddp.get('ranks_in_step')}."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    from recbole_popprior.utils import atomic_write, write_json

    with atomic_write(out / "gpu_check.md", "w") as handle:
        handle.write(summary_markdown(report))
    write_json(out / "gpu_check.json", report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="folder for gpu_check.json / .md and data")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    parser.add_argument("--deadline", type=float, default=None, help="global seconds (default 450, quick 240)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA device (torch.cuda.is_available() is False); "
              "use --device=cpu --quick for the dry run", file=sys.stderr)
        return EXIT_BAD_INPUT
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or (args.deadline is not None and not (math.isfinite(args.deadline) and args.deadline > 0)):
        print(f"error: unknown part {unknown[0]!r}" if unknown else "error: --deadline must be > 0", file=sys.stderr)
        return EXIT_BAD_INPUT
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    os.chdir(args.output)  # whatever RecBole writes relative to the working directory stays in the output
    import recbole_popprior  # noqa: F401  (applies the compat shims, registers the metrics)

    seconds = args.deadline if args.deadline is not None else (240.0 if args.quick else 450.0)
    deadline = Deadline(seconds)
    limits = QUICK_LIMITS if args.quick else PART_LIMITS
    report: dict[str, Any] = {"device": args.device, "quick": args.quick, "deadline_s": seconds, "parts": {}}
    start = time.perf_counter()
    for name in parts:
        part_start = time.perf_counter()
        entry: dict[str, Any]
        if deadline.left() <= 0:
            entry = {"status": "skipped", "error": "global deadline reached"}
        else:
            try:
                entry = PARTS[name](args, deadline.part(limits[name]))
                entry["status"] = "failed" if entry.get("failures") or entry.get("error") else "ok"
            except OutOfTime as exc:
                entry = {"status": "cut short", "error": str(exc)}
            except Exception as exc:
                entry = {"status": "error", "error": one_line(exc),
                         "where": traceback.format_exc().strip().splitlines()[-4:]}
        entry["seconds"] = round(time.perf_counter() - part_start, 1)
        report["parts"][name] = entry
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_report(args.output, report)  # after every part: a cut-off run still leaves its figures
        print(f"{name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
