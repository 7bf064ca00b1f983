"""The distributed launcher (recbole_popprior/distributed.py): RecBole's DDP path with gloo on CPU.

The 2-process runs go through the real CLI in a subprocess; the reference for each check
is computed independently in this process (numpy counts, a single-process evaluation of
the saved model, dense H^T H).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from recbole_popprior import compat, distributed
from recbole_popprior.errors import PopPriorError

from conftest import free_port, tiny_config, tiny_rows, write_inter

ROOT = Path(__file__).resolve().parent.parent
N_USERS = 59  # odd: with 2 ranks, torch's DistributedSampler would repeat one context
MAX_CONTEXTS = 41  # energy_max_contexts of the 2-process run


def energy_metrics_available() -> bool:
    from recbole.evaluator.register import metrics_dict

    return "popenergy" in metrics_dict


# --- launch settings --------------------------------------------------------------------
def test_options_follow_recbole_ddp_arguments():
    one_node = distributed.world_from_options({"nproc": 2, "world_size": -1, "ip": "127.0.0.1",
                                               "port": "5678", "group_offset": 0})
    assert one_node == {"world_size": 2, "nproc": 2, "offset": 0, "ip": "127.0.0.1", "port": "5678"}
    node_b = distributed.world_from_options({"nproc": 2, "world_size": 4, "ip": "10.0.0.1",
                                             "port": 5678, "group_offset": 2})
    assert node_b == {"world_size": 4, "nproc": 2, "offset": 2, "ip": "10.0.0.1", "port": "5678"}


@pytest.mark.parametrize("options, match", [
    ({"nproc": 4, "world_size": 2}, "world_size"),
    ({"nproc": 2, "world_size": 4, "group_offset": 3}, "group_offset"),
    ({"nproc": 0}, "nproc"),
    ({"nproc": 2, "port": "http"}, "port"),
    ({"nproc": 2, "port": 70000}, "port"),
])
def test_bad_launch_options_are_one_line_errors(options, match):
    with pytest.raises(PopPriorError, match=match):
        distributed.world_from_options(options)


def test_torchrun_environment_maps_onto_recbole_keys():
    env = {"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "5678"}
    assert distributed.world_from_torchrun(env) == {
        "local_rank": 1, "offset": 2, "world_size": 4, "nproc": 2, "ip": "10.0.0.1", "port": "5678",
        "ddp_init_method": "env://"}
    with pytest.raises(PopPriorError, match="torchrun"):
        distributed.world_from_torchrun({"LOCAL_RANK": "2", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})


@pytest.mark.parametrize("settings, match", [
    ({"ddp_backend": "mpi"}, "ddp_backend"),
    ({"ddp_backend": "nccl", "gpu_id": ""}, "CUDA"),
    ({"local_rank": 2, "nproc": 2, "world_size": 2}, "local_rank"),
])
def test_backend_shim_rejects_bad_settings_before_joining(settings, match):
    config = {"local_rank": 0, "nproc": 2, "world_size": 2, "gpu_id": "", **settings}
    with pytest.raises(PopPriorError, match=match):
        compat.init_distributed(config)
    assert not torch.distributed.is_initialized()


# --- evaluation shards ------------------------------------------------------------------
@pytest.mark.parametrize("n, world", [(59, 2), (10, 3), (7, 4), (8, 4)])
def test_unpadded_eval_shards_partition_the_contexts(n, world):
    padded = [list(DistributedSampler(list(range(n)), num_replicas=world, rank=r, shuffle=False))
              for r in range(world)]
    loaders = [SimpleNamespace(sampler=DistributedSampler(list(range(n)), num_replicas=world, rank=r,
                                                          shuffle=False)) for r in range(world)]
    for loader in loaders:
        distributed.unpad_eval_sampler(loader)
    shards = [list(loader.sampler) for loader in loaders]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(loader.sampler) for loader in loaders] == [len(shard) for shard in shards]
    # torch's own sampler repeats contexts whenever world does not divide n
    assert (sum(map(len, padded)) > n) == (n % world != 0)


def test_too_few_contexts_for_the_processes_is_an_error():
    loader = SimpleNamespace(sampler=DistributedSampler(list(range(2)), num_replicas=3, rank=0, shuffle=False))
    with pytest.raises(PopPriorError, match="fewer than"):
        distributed.unpad_eval_sampler(loader)


# --- a 2-process gloo run through the CLI ----------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Train SASRec with 2 gloo processes on CPU through ``run_recbole_popprior.py --nproc=2``."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    write_inter(data / "tiny" / "tiny.inter", tiny_rows(n_users=N_USERS))
    overrides = tiny_config(data, fast_loader=False, output=str(root / "saved"))
    if energy_metrics_available():
        overrides["metrics"] = overrides["metrics"] + ["PopEnergy"]
    overrides["energy_permutations"] = 0
    # fewer than all contexts, odd: the same first MAX_CONTEXTS contexts must count under DDP as in
    # one process (each rank capping its own shard would count up to 2 x 41, and other contexts)
    overrides["energy_max_contexts"] = MAX_CONTEXTS
    args = [f"--{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in overrides.items()]
    cmd = [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--model=SASRec", "--dataset=tiny",
           "--nproc=2", "--ddp_backend=gloo", f"--port={free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        # Seen once in ~25 runs on a loaded 2-core machine: a gloo worker aborting in C++
        # ("terminate called without an active exception"). Retry once on a fresh port and
        # folder, and say so; a second failure fails the tests below.
        warnings.warn(f"2-process gloo run aborted, retrying once: {proc.stderr.strip().splitlines()[0]}")
        shutil.rmtree(root / "saved", ignore_errors=True)
        cmd = [c if not c.startswith("--port=") else f"--port={free_port()}" for c in cmd]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    runs = list((root / "saved").glob("SASRec-tiny-*"))
    return SimpleNamespace(proc=proc, root=root, data=data, overrides=overrides, runs=runs)


def _results(ddp_run) -> dict:
    assert ddp_run.proc.returncode == 0, ddp_run.proc.stderr[-3000:]
    assert len(ddp_run.runs) == 1, ddp_run.runs  # one run folder shared by both ranks
    return json.loads((ddp_run.runs[0] / "results.json").read_text())


def test_two_gloo_processes_train_in_step_and_rank_0_writes_results(ddp_run):
    result = _results(ddp_run)
    info = result["distributed"]
    assert (info["world_size"], info["backend"], info["rank"]) == (2, "gloo", 0)
    assert [r["rank"] for r in info["ranks"]] == [0, 1]
    # gradients were all-reduced: both replicas hold the same weights after training
    digests = info["trained_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert sorted(p.name for p in ddp_run.runs[0].iterdir() if p.suffix == ".json") == ["results.json"]
    assert result["test_result"] and result["checkpoint"].endswith("model.pth")


def test_spawned_workers_import_the_plugin_and_register_its_metrics(ddp_run):
    from recbole.evaluator.register import metrics_dict

    ours = sorted(name for name, cls in metrics_dict.items() if cls.__module__.startswith("recbole_popprior"))
    assert ours, "the plugin registers no metrics in this process"
    for rank in _results(ddp_run)["distributed"]["ranks"]:
        assert rank["plugin_metrics"] == ours


def test_prior_is_the_full_training_split_prior_on_every_rank(ddp_run):
    from recbole_popprior.quick_start import build_config
    from recbole_popprior.data import create_dataset

    result = _results(ddp_run)
    ranks = result["distributed"]["ranks"]
    keys = ("train_targets", "train_targets_sha256", "log_prior_sha256")
    assert {tuple(r[k] for k in keys) for r in ranks} == {tuple(ranks[0][k] for k in keys)}
    assert all(r["log_prior_sha256"] == r["model_log_prior_sha256"] for r in ranks)

    # Reference: count next-item targets of the training split (leave-one-out in time
    # order: the last two events of every user are validation and test) with numpy.
    rows = np.array(tiny_rows(n_users=N_USERS))
    counts: dict[int, int] = {}
    n_targets = 0
    for user in np.unique(rows[:, 0]):
        items = rows[rows[:, 0] == user]
        items = items[np.argsort(items[:, 2]), 1]
        for item in items[1:-2]:
            counts[int(item)] = counts.get(int(item), 0) + 1
            n_targets += 1
    assert ranks[0]["train_targets"] == n_targets
    dataset = create_dataset(build_config("SASRec", "tiny", config_dict=dict(ddp_run.overrides)))
    tokens = dataset.field2id_token["item_id"]
    n = len(tokens) - 1  # padding excluded
    alpha = 1.0
    expected = np.full(len(tokens), -np.inf)
    for idx, token in enumerate(tokens[1:], start=1):
        expected[idx] = np.log((counts.get(int(token), 0) + alpha) / (n_targets + alpha * n))
    saved = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]["log_prior"]
    np.testing.assert_allclose(saved.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_energy_metrics_match_a_single_process_evaluation_of_the_saved_model(ddp_run, tmp_path, monkeypatch):
    if not energy_metrics_available():
        pytest.fail("PopEnergy is not registered: the evaluator's metrics are missing")
    from recbole_popprior.quick_start import build_config, build_pipeline

    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes log_tensorboard/ under the cwd
    result = _results(ddp_run)
    # the statistics were summed over both ranks: each of the first MAX_CONTEXTS test contexts counted once
    assert result["test_result"]["pop_contexts"] == MAX_CONTEXTS
    config = build_config("SASRec", "tiny", config_dict={**ddp_run.overrides, "run_dir": str(tmp_path)})
    pipe = build_pipeline(config, log=False)
    pipe.trainer.eval_collector.data_collect(pipe.train_data)
    pipe.trainer.load_model_file(result["checkpoint"])
    single = pipe.trainer.evaluate(pipe.test_data, load_best_model=False)
    energy_keys = [key for key in single if key.startswith("pop_")]
    assert "pop_dir_frac" in energy_keys and single["pop_contexts"] == MAX_CONTEXTS
    for key in energy_keys:
        assert result["test_result"][key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


def test_bad_backend_in_workers_ends_with_one_error_line(tmp_path, tiny_data):
    cmd = [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--model=SASRec", "--dataset=tiny",
           f"--data_path={tiny_data}", "--nproc=2", "--ddp_backend=nccl", "--gpu_id=", f"--port={free_port()}",
           "--fast_loader=False", f"--output={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ddp_backend=nccl needs CUDA")
