"""One training step at the headline shape, part by part, beside its floor (docs/DESIGN.md §11).

    python benchmarks/bench_step.py [--quick] [--items 731000] [--batch 2048] [--length 50]
        [--negatives 8192] [--repeats 5] [--sections machine,profile,goals,ablation,sampled] [--eval]

The headline shape: prior-separated SASRec at RecBole's defaults (hidden 64, 2 layers, 2 heads,
inner 256, dropout 0.5, batch 2048, ``MAX_ITEM_LIST_LENGTH`` 50) over the Tianchi log's 731k items,
with ``softmax_negatives: 8192``. The model is built on a stand-in dataset that has the item count
and a Zipf-popular target list (what the model and the prior read of a dataset); the batch is a
collated batch of a generated UserBehavior-shaped log (``bench_scale.py``'s generator) whose item
ids are redrawn Zipf-popular over the 731k items. Sections:

- ``machine``: this machine's matmul GFLOP/s (float32 and bfloat16: 2048^3 and the step's own
  shapes) and memory bandwidth (a 256 MB copy), measured here; the floors below use the best rates.
- ``profile``: one step of each arm split into data collation, encoder forward, loss head
  (forward; the negatives' draw included), loss-head backward, encoder backward and the optimiser
  step (with ``zero_grad``). The head runs on a detached copy of the contexts ``H``, so its backward
  and the encoder's are timed apart. Each part's floor is ``max(FLOPs / matmul rate, bytes /
  bandwidth)``: the matmul FLOPs of that part, and the bytes it must move at least (the tensors
  autograd saves, written once forward and read once backward, plus the parameter gradients; Adam
  reads and writes 28 bytes per updated parameter).
- ``goals``: whole steps (RecBole's ``_train_epoch`` body: ``zero_grad``, the loss under
  ``torch.autocast(enabled=enable_amp)``, ``backward``, ``step``, ``loss.item()``) of the arms
  ``today`` (the plugin before issue 24: glibc's allocator as it is, RecBole's kernels),
  ``defaults`` (the allocator tuned, ``runtime.py``; the same numbers, checked bit for bit) and
  ``preset`` (``properties/fast.yaml``), interleaved step by step (A B C C B A ...); rows/s add
  the median collation time to each step.
- ``ablation``: each key of the preset added in turn, each pair interleaved on its own.
- ``sampled``: at 96k items (the 10M-row log), ``preset`` with K = 8192 against the same model
  with the full softmax, interleaved, and the Amdahl bound: the full step over the parts sampling
  cannot remove (collation, encoder forward and backward).

glibc's allocator cannot be switched back in one process, so ``today`` is emulated: before each
of its steps the mmap threshold is set to 32 MB, the steady state of glibc's dynamic threshold
(its maximum on 64-bit; every block above it is mapped and unmapped again, as today). The trim
threshold stays high in every arm so that a ``today`` step does not trim the heap that the next
tuned step would fault in again. Medians over ``--repeats``; these machines are shared and noisy:
read the ratios, measured side by side, not the absolute times. ``--eval`` then runs
``benchmarks/bench_eval_step.py`` (the evaluation's profile) when it is present.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
if os.environ.get("BENCH_STEP_TODAY") == "1":
    import torch  # noqa: F401  (today's start-up: torch, and its OpenMP runtime, before the plugin)

import recbole_popprior  # noqa: E402,F401  (first: OpenMP's wait policy, then the compat shims)
import numpy as np  # noqa: E402
import torch  # noqa: E402,F811
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_popprior import runtime  # noqa: E402
from recbole_popprior.config import Config  # noqa: E402
from recbole_popprior.model.factors import training_factors  # noqa: E402
from recbole_popprior.model.objective import TrainingBatch  # noqa: E402
from recbole_popprior.optim import build_optimizer  # noqa: E402

SECTIONS = ("machine", "profile", "goals", "ablation", "sampled")
PRESET_KEYS = ("fast_gelu", "fast_dropout", "fast_last_position", "fast_adam", "fast_sparse_items", "enable_amp")
GLIBC_MAX_DYNAMIC_MMAP = 32 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


# ----------------------------------------------------------------------------- the allocator
class Allocator:
    """glibc's mmap threshold per arm: tuned (``runtime.MMAP_THRESHOLD``) or today's (32 MB)."""

    def __init__(self):
        self.libc = runtime._glibc() if runtime.allocator_skip_reason() is None else None
        if self.libc is not None:
            self.libc.mallopt(_M_TRIM_THRESHOLD, runtime.TRIM_THRESHOLD)
        self.current = None

    def set(self, tuned: bool) -> None:
        if self.libc is not None and tuned != self.current:
            self.libc.mallopt(_M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD if tuned else GLIBC_MAX_DYNAMIC_MMAP)
            self.current = tuned


# ----------------------------------------------------------------------------- the machine
def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(args) -> dict[str, float]:
    """Matmul GFLOP/s (float32, bfloat16) at 2048^3 and at the step's shapes, and copy bandwidth (GB/s):
    the best of the repeats, since a floor is what the machine can do (a shared machine's median is less)."""
    out: dict[str, float] = {}
    shapes = {"2048^3": (2048, 2048, 2048), "ffn": (args.batch * args.length, 64, 256),
              "head": (args.batch, 64, args.negatives)}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for label, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            seconds = _best_seconds(lambda: a @ b, 3 if args.quick else 5)
            out[f"{name}_{label}"] = 2 * m * k * n / seconds / 1e9
        out[f"{name}_best"] = max(out[f"{name}_{label}"] for label in shapes)
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), 7)
    out["copy_gbs"] = 2 * src.numel() * 4 / seconds / 1e9
    return out


# ----------------------------------------------------------------------------- data
class StandInData:
    """What a RecBole sequential model and the prior read of a dataset: the item count and the
    training targets (Zipf-popular, as the real log's)."""

    def __init__(self, n_items: int, targets: torch.Tensor):
        self.n_items = n_items
        self.inter_feat = {"item_id": targets}

    def num(self, field: str) -> int:
        return self.n_items


def zipf_items(rng: np.random.Generator, size: int, n_items: int, zipf: float = 1.1) -> np.ndarray:
    """Item ids in ``[1, n_items)`` with Zipf-like popularity (bench_scale's ranks and bijection)."""
    from bench_scale import _zipf_ranks

    real = n_items - 1
    multiplier = next(m for m in range(2654435761, 2654435761 + 10_000) if math.gcd(m, real) == 1)
    return (_zipf_ranks(rng, size, real, zipf) * multiplier) % real + 1


def collated_loader(args, cache: Path):
    """The plugin's lean training loader over a generated UserBehavior-shaped log (batch ``args.batch``)."""
    from bench_scale import generate

    from recbole_popprior.converters import convert
    from recbole_popprior.data import create_dataset, data_preparation

    raw = generate(cache / f"UserBehavior_{args.collate_rows}.csv", args.collate_rows)
    out = cache / f"converted_{args.collate_rows}"
    if not (out / "tianchi" / "tianchi.inter").is_file():
        convert("tianchi", str(raw), str(out), progress=False)
    config = Config(model="SASRec", dataset="tianchi", config_dict={
        "data_path": str(out), "gpu_id": "", "state": "WARNING", "show_progress": False,
        "train_batch_size": args.batch, "MAX_ITEM_LIST_LENGTH": args.length})
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    return train


def measure_collation(loader, repeats: int) -> tuple[float, Interaction]:
    """Median seconds to collate one full training batch, and one such batch."""
    times, batch = [], None
    iterator = iter(loader)
    for _ in range(repeats + 1):
        start = time.perf_counter()
        got = next(iterator, None)
        if got is None:
            iterator = iter(loader)
            continue
        elapsed = time.perf_counter() - start
        if len(got) == loader.step:
            times.append(elapsed)
            batch = got
    return statistics.median(times[1:] or times), batch


def headline_batch(collated: Interaction, n_items: int, seed: int = 0) -> Interaction:
    """The collated batch with its item ids redrawn Zipf-popular over ``n_items`` (same lengths)."""
    rng = np.random.default_rng(seed)
    seq = collated["item_id_list"].clone()
    real = seq != 0
    seq[real] = torch.from_numpy(zipf_items(rng, int(real.sum()), n_items))
    targets = torch.from_numpy(zipf_items(rng, len(seq), n_items))
    return Interaction({"item_id_list": seq, "item_length": collated["item_length"].clone(), "item_id": targets})


# ----------------------------------------------------------------------------- arms
@dataclass
class Arm:
    name: str
    tuned_allocator: bool
    settings: dict[str, Any]
    config: Any = None
    model: Any = None
    optimizer: Any = None
    amp: bool = False
    times: list = field(default_factory=list)


def build_arm(arm: Arm, args, n_items: int, negatives: int) -> Arm:
    """The arm's config (``fast.yaml`` when its settings say so), model and optimiser; the same seed
    for every arm, so the ``today`` and ``defaults`` models start from the same weights."""
    settings = dict(arm.settings)
    files = ["fast"] if settings.pop("preset", False) else None
    config = Config(model="SASRec", dataset="tianchi", config_file_list=files, config_dict={
        "gpu_id": "", "state": "WARNING", "show_progress": False, "train_batch_size": args.batch,
        "MAX_ITEM_LIST_LENGTH": args.length, "softmax_negatives": negatives, **settings})
    rng = np.random.default_rng(1)
    stand_in = StandInData(n_items, torch.from_numpy(zipf_items(rng, 200_000, n_items)))
    init_seed(config["seed"], config["reproducibility"])
    model = config.model_class(config, stand_in)
    model.train()
    optimizer = build_optimizer(config, model) or torch.optim.Adam(
        model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])  # RecBole's
    arm.config, arm.model, arm.optimizer, arm.amp = config, model, optimizer, bool(config["enable_amp"])
    return arm


def whole_step(arm: Arm, batch: Interaction) -> float:
    """RecBole's ``_train_epoch`` body for one batch (CPU: no GradScaler); seconds."""
    start = time.perf_counter()
    arm.optimizer.zero_grad()
    with torch.autocast(device_type="cpu", enabled=arm.amp):
        loss = arm.model.calculate_loss(batch)
    loss.item()
    loss.backward()
    arm.optimizer.step()
    return time.perf_counter() - start


def head_loss(model, H: torch.Tensor, E: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss from the contexts: the sampled objective, or SASRec's own full-softmax CE head."""
    if model.training_objective is not None:
        return model.training_objective.loss(model, TrainingBatch(H, E, targets))
    return model.loss_fct(H @ E.T, targets)


class SavedBytes(contextlib.AbstractContextManager):
    """Bytes of the distinct tensors autograd saves inside the block (what backward must read)."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and not isinstance(t, torch.nn.Parameter):
            self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


PARTS = ("encoder forward", "loss head", "head backward", "encoder backward", "optimiser step")


def split_step(arm: Arm, batch: Interaction, count_bytes: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """One step in parts (see the module docstring); seconds per part and, if asked, bytes saved."""
    model, clock = arm.model, time.perf_counter
    enc_bytes, head_bytes = SavedBytes(), SavedBytes()
    t0 = clock()
    with torch.autocast(device_type="cpu", enabled=arm.amp), (enc_bytes if count_bytes else contextlib.nullcontext()):
        parts = training_factors(model, batch)
    t1 = clock()
    leaf = parts.H.detach().requires_grad_(True)
    with torch.autocast(device_type="cpu", enabled=arm.amp), (head_bytes if count_bytes else contextlib.nullcontext()):
        loss = head_loss(model, leaf, parts.E, parts.targets)
    loss.item()
    t2 = clock()
    loss.backward()
    t3 = clock()
    parts.H.backward(leaf.grad)
    t4 = clock()
    grad_bytes = sum(p.grad._values().nbytes if p.grad.is_sparse else p.grad.nbytes
                     for p in model.parameters() if p.grad is not None)
    sparse_rows = sum(int(p.grad.coalesce().indices().unique().numel()) for p in model.parameters()
                      if p.grad is not None and p.grad.is_sparse) if count_bytes else 0
    t5 = clock()
    arm.optimizer.step()
    arm.optimizer.zero_grad()
    t6 = clock()
    seconds = dict(zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)))
    return seconds, {"encoder": enc_bytes.total, "head": head_bytes.total, "grads": grad_bytes,
                     "sparse_rows": sparse_rows}


def interleave(arms: list[Arm], step: Callable[[Arm], Any], repeats: int, allocator: Allocator,
               warmup: int = 1) -> None:
    """``step(arm)`` for every arm, ``warmup`` rounds and then ``repeats`` rounds, the order reversed
    every round (A B C, C B A, ...); what each returns goes to ``arm.times``."""
    for arm in arms:
        arm.times = []
    for r in range(warmup + repeats):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            allocator.set(arm.tuned_allocator)
            got = step(arm)
            if r >= warmup:
                arm.times.append(got)


# ----------------------------------------------------------------------------- floors
def encoder_flops(args, last_position: bool = False) -> float:
    """Matmul FLOPs of SASRec's encoder forward (per layer: Q, K, V, output; the feed-forward pair;
    the attention scores and their product with V). With ``fast_last_position`` the last layer computes
    K and V at every position and the rest for one query per sequence."""
    B, L, d, inner, layers = args.batch, args.length, 64, 256, 2
    tokens = B * L
    per_layer = 4 * 2 * tokens * d * d + 2 * 2 * tokens * d * inner + 2 * 2 * B * L * L * d
    if not last_position:
        return layers * per_layer
    last = 2 * 2 * tokens * d * d + 2 * 2 * B * d * d + 2 * 2 * B * d * inner + 2 * 2 * B * L * d
    return (layers - 1) * per_layer + last


def head_flops(args, n_items: int, negatives: int) -> float:
    width = negatives if negatives else n_items
    return 2 * args.batch * width * 64 + (2 * args.batch * 64 if negatives else 0)


def floors(args, machine: dict, arm: Arm, n_items: int, negatives: int, counted: dict) -> dict[str, float]:
    """Seconds per part at the floor: max(FLOPs / best matmul rate, bytes / copy bandwidth)."""
    rate = machine["bf16_best" if arm.amp else "fp32_best"] * 1e9
    bw = machine["copy_gbs"] * 1e9
    n_params = sum(p.numel() for p in arm.model.parameters())
    table = arm.model.item_embedding.weight.numel()
    updated = n_params - table + counted["sparse_rows"] * 64 if counted["sparse_rows"] else n_params
    enc = encoder_flops(args, bool(arm.config["fast_last_position"]))
    head = head_flops(args, n_items, negatives)
    return {
        "data collation": 2 * args.batch * args.length * 8 / bw,
        "encoder forward": max(enc / rate, counted["encoder"] / bw),
        "loss head": max(head / rate, counted["head"] / bw),
        "head backward": max(2 * head / rate, (counted["head"] + args.batch * 64 * 4) / bw),
        "encoder backward": max(2 * enc / rate, (counted["encoder"] + counted["grads"]) / bw),
        "optimiser step": 28 * updated / bw,
        "_gflop": {"encoder forward": enc / 1e9, "loss head": head / 1e9, "head backward": 2 * head / 1e9,
                   "encoder backward": 2 * enc / 1e9},
    }


# ----------------------------------------------------------------------------- sections
def run_profile(args, machine, arms: list[Arm], batch, collate_s: float, n_items: int, negatives: int,
                allocator: Allocator, title: str) -> dict:
    """The split step of each arm, interleaved; one table per arm."""
    counted = {}
    for arm in arms:  # one untimed step counts the saved bytes (the hooks cost time)
        allocator.set(arm.tuned_allocator)
        counted[arm.name] = split_step(arm, batch, count_bytes=True)[1]
    interleave(arms, lambda arm: split_step(arm, batch)[0], args.repeats, allocator)
    report = {}
    print(f"\n### {title}\n")
    for arm in arms:
        med = {part: statistics.median(t[part] for t in arm.times) for part in PARTS}
        med = {"data collation": collate_s, **med}
        step = sum(med.values())
        floor = floors(args, machine, arm, n_items, negatives, counted[arm.name])
        floor_step = sum(v for k, v in floor.items() if not k.startswith("_"))
        print(f"arm `{arm.name}` ({'bf16 autocast' if arm.amp else 'fp32'}): {step * 1000:,.0f} ms per step, "
              f"{args.batch / step:,.0f} rows/s; floor {floor_step * 1000:,.0f} ms ({args.batch / floor_step:,.0f} rows/s)\n")
        print("| part | ms | % of step | GFLOP | floor ms | x floor |")
        print("|---|---:|---:|---:|---:|---:|")
        for part, seconds in med.items():
            gflop = floor["_gflop"].get(part)
            print(f"| {part} | {seconds * 1000:,.0f} | {100 * seconds / step:.0f}% | "
                  f"{'' if gflop is None else f'{gflop:.1f}'} | {floor[part] * 1000:,.1f} | {seconds / floor[part]:,.1f} |")
        print(f"| **step** | **{step * 1000:,.0f}** | 100% | | {floor_step * 1000:,.0f} | {step / floor_step:.1f} |\n")
        report[arm.name] = {"ms": {k: v * 1000 for k, v in med.items()}, "step_ms": step * 1000,
                            "floor_ms": {k: v * 1000 for k, v in floor.items() if not k.startswith("_")},
                            "saved_bytes": counted[arm.name]}
    return report


def check_identical(today: Arm, defaults: Arm, batch, allocator: Allocator) -> bool:
    """The allocator changes no number: one step of each from the same RNG state, bit for bit."""
    results = []
    for arm in (today, defaults):
        allocator.set(arm.tuned_allocator)
        torch.manual_seed(7)
        arm.optimizer.zero_grad()
        loss = arm.model.calculate_loss(batch)
        loss.backward()
        results.append((loss.detach().clone(), [p.grad.clone() for p in arm.model.parameters() if p.grad is not None]))
        arm.optimizer.zero_grad()
    (l0, g0), (l1, g1) = results
    return bool(torch.equal(l0, l1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1)))


GOAL_ARMS = {"today": {"malloc_tuning": False}, "defaults": {}, "preset": {"preset": True}}
#: the goals' arms in fresh processes: (config settings, glibc tuned, OpenMP's default spinning policy);
#: ``allocator`` is ``defaults`` with today's policy, so that the two defaults are measured apart
PROCESS_ARMS = {"today": (GOAL_ARMS["today"], False, True), "allocator": ({}, True, True),
                "defaults": ({}, True, False), "preset": (GOAL_ARMS["preset"], True, False)}


def goal_child(spec: dict) -> None:
    """One arm in a fresh process (``--child``): start-up as a run of that arm would have it, then
    ``warmup + steps`` whole steps on the saved batch; prints ``RESULT {json}``."""
    args = argparse.Namespace(**spec["args"])
    settings, tuned, _ = PROCESS_ARMS[spec["arm"]]
    if spec["arm"] != "today":
        runtime.apply_runtime({"malloc_tuning": tuned})  # what build_pipeline does: the allocator, the threads
    batch = Interaction(torch.load(spec["batch"], weights_only=True))
    arm = build_arm(Arm(spec["arm"], tuned, dict(settings)), args, args.items, args.negatives)
    times = [whole_step(arm, batch) for _ in range(spec["warmup"] + spec["steps"])][spec["warmup"]:]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"times": times, "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                  "threads": torch.get_num_threads(), "user_s": usage.ru_utime,
                                  "sys_s": usage.ru_stime, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (getrusage's ``ru_maxrss`` survives ``exec`` on Linux,
    so a child would report its parent's peak), else ``ru_maxrss``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_goals(args, batch, collate_s: float) -> dict:
    """Whole steps of :data:`PROCESS_ARMS`, each arm in its own fresh process (so that start-up is each
    arm's own: glibc's allocator and OpenMP's wait policy cannot be switched back in a process), rounds
    alternating (A B C D, D C B A, ...); medians over every timed step of an arm."""
    path = Path(args.cache) / "headline_batch.pt"
    torch.save({k: batch[k] for k in batch.interaction}, path)
    times: dict[str, list[float]] = {name: [] for name in PROCESS_ARMS}
    info: dict[str, dict] = {}
    names = list(PROCESS_ARMS)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "BENCH_STEP_TODAY")}
            if PROCESS_ARMS[name][2]:
                env["BENCH_STEP_TODAY"] = "1"  # torch first: libgomp keeps its default policy
            spec = {"arm": name, "args": vars(args), "batch": str(path), "warmup": 1, "steps": args.child_steps}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"goal arm {name} failed:\n{proc.stderr[-3000:]}")
            got = json.loads(lines[-1][7:])
            times[name] += got["times"]
            info[name] = got
            print(f"  round {r + 1} {name}: {[round(t, 2) for t in got['times']]} s "
                  f"(OMP_WAIT_POLICY={got['wait_policy']}, {got['threads']} threads)", file=sys.stderr, flush=True)
    rates = {name: args.batch / (statistics.median(t) + collate_s) for name, t in times.items()}
    print("\n### Goals: whole steps, each arm in fresh processes, rounds alternating\n")
    print("| arm | median step s | rows/s (with collation) | x today | goal | peak RSS |")
    print("|---|---:|---:|---:|---|---:|")
    goals = {"defaults": 1.5, "preset": 3.0}  # `allocator` is a part of `defaults`, no goal of its own
    for name in names:
        ratio = rates[name] / rates["today"]
        target = goals.get(name)
        met = "" if target is None else f">= {target:g}x " + ("met" if ratio >= target else "**not met**")
        print(f"| {name} | {statistics.median(times[name]):.2f} | {rates[name]:,.0f} | {ratio:.2f} | {met} | "
              f"{info[name]['peak_rss'] / 2**30:.1f} GB |")
    return {"rows_per_s": rates, "step_s": times, "children": info}


def run_ablation(args, batch, collate_s: float, n_items: int, allocator: Allocator) -> dict:
    """Each preset key on top of the previous ones, each pair interleaved on its own."""
    print("\n### Ablation: each key of the preset on top of the previous ones (pairs interleaved)\n")
    print("| key added | step s before | step s after | speed-up |")
    print("|---|---:|---:|---:|")
    settings: dict[str, Any] = {key: False for key in PRESET_KEYS}
    prev = build_arm(Arm("defaults", True, dict(settings)), args, n_items, args.negatives)
    out = {}
    for key in PRESET_KEYS:
        settings[key] = True
        nxt = build_arm(Arm(f"+{key}", True, dict(settings)), args, n_items, args.negatives)
        interleave([prev, nxt], lambda arm: whole_step(arm, batch), args.repeats, allocator)
        before, after = statistics.median(prev.times), statistics.median(nxt.times)
        out[key] = before / after
        print(f"| {key} | {before:.2f} | {after:.2f} | {before / after:.2f}x |", flush=True)
        prev = nxt
    return out


def run_sampled(args, machine, batch_96k, collate_s: float, allocator: Allocator) -> dict:
    n_items = args.sampled_items
    sampled = build_arm(Arm("preset, K=8192", True, {"preset": True}), args, n_items, args.negatives)
    full = build_arm(Arm("preset, full softmax", True, {"preset": True}), args, n_items, 0)
    interleave([sampled, full], lambda arm: whole_step(arm, batch_96k), args.repeats, allocator)
    sampled_s, full_s = statistics.median(sampled.times), statistics.median(full.times)
    ratio = full_s / sampled_s
    prof = run_profile(args, machine, [full], batch_96k, collate_s, n_items, 0, allocator,
                       f"Full softmax at {n_items:,} items, preset kernels (the Amdahl bound)")
    ms = prof[full.name]["ms"]
    fixed = ms["data collation"] + ms["encoder forward"] + ms["encoder backward"]
    bound = prof[full.name]["step_ms"] / fixed
    print(f"\nsampled (K = {args.negatives}) / full softmax at {n_items:,} items, preset: {ratio:.2f}x the rows/s "
          f"(medians {sampled_s:.2f} s vs {full_s:.2f} s per step); "
          f"Amdahl bound {bound:.2f}x (full step {prof[full.name]['step_ms']:,.0f} ms over the collation and encoder "
          f"forward + backward, {fixed:,.0f} ms, which sampling cannot remove); goal >= 3x: "
          f"{'met' if ratio >= 3 else 'not met'}")
    return {"ratio": ratio, "amdahl_bound": bound, "profile": prof}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 round; machine, profile and goals only")
    parser.add_argument("--items", type=int, default=731_000)
    parser.add_argument("--sampled-items", type=int, default=96_000, help="item count of the sampled-vs-full section")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--negatives", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--collate-rows", type=int, default=400_000, help="rows of the generated log for collation")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lean", "bench_step"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the goals' fresh processes")
    parser.add_argument("--child-steps", type=int, default=4, help="timed steps per goal process (after 1 warm-up)")
    parser.add_argument("--eval", action="store_true", help="then run benchmarks/bench_eval_step.py, if present")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        goal_child(json.loads(args.child))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.quick:
        args.repeats, args.rounds, args.child_steps = min(args.repeats, 2), 1, 2
        sections = [s for s in sections if s in ("machine", "profile", "goals")] if args.sections == ",".join(SECTIONS) \
            else sections
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    threads = runtime.configure_threads({})
    allocator = Allocator()
    print(f"bench_step: SASRec, {args.items:,} items, batch {args.batch}, length {args.length}, K = {args.negatives}; "
          f"torch {torch.__version__}, {threads} thread(s) of {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, repeats {args.repeats}; glibc tuning "
          f"{'available' if allocator.libc is not None else 'unavailable: ' + str(runtime.allocator_skip_reason())}")
    results: dict[str, Any] = {"args": vars(args)}
    allocator.set(True)
    machine = measure_machine(args)
    results["machine"] = machine
    print(f"\nmatmul GFLOP/s, float32: 2048^3 {machine['fp32_2048^3']:.0f}, encoder FFN shape {machine['fp32_ffn']:.0f}, "
          f"head shape {machine['fp32_head']:.0f}; bfloat16: {machine['bf16_2048^3']:.0f}, {machine['bf16_ffn']:.0f}, "
          f"{machine['bf16_head']:.0f}; copy bandwidth {machine['copy_gbs']:.1f} GB/s")
    loader = collated_loader(args, Path(args.cache))
    collate_s, collated = measure_collation(loader, max(5, args.repeats))
    print(f"data collation (lean loader, batch {args.batch}): {collate_s * 1000:.1f} ms median")
    batch = headline_batch(collated, args.items)
    arms = [build_arm(Arm(name, name != "today", dict(settings)), args, args.items, args.negatives)
            for name, settings in GOAL_ARMS.items()]
    results["bit_identical_defaults"] = check_identical(arms[0], arms[1], batch, allocator)
    print(f"defaults vs today, one step from the same weights and RNG state: loss and every gradient "
          f"bit-identical: {results['bit_identical_defaults']}")
    if "profile" in sections:
        results["profile"] = run_profile(args, machine, arms, batch, collate_s, args.items, args.negatives,
                                         allocator, "Profile of one step at the headline shape")
    del arms
    if "goals" in sections:
        results["goals"] = run_goals(args, batch, collate_s)
    if "ablation" in sections:
        results["ablation"] = run_ablation(args, batch, collate_s, args.items, allocator)
    if "sampled" in sections:
        results["sampled"] = run_sampled(args, machine, headline_batch(collated, args.sampled_items), collate_s,
                                         allocator)
    peak = peak_rss() / 2**30
    print(f"\npeak RSS of this process {peak:.1f} GB; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.eval:
        script = ROOT / "benchmarks" / "bench_eval_step.py"
        if script.is_file():
            return subprocess.call([sys.executable, str(script)] + (["--quick"] if args.quick else []))
        print("(benchmarks/bench_eval_step.py is not present: no evaluation profile)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
