"""Start-up settings that change no number (recbole_popprior/runtime.py, recbole_popprior/openmp.py,
docs/DESIGN.md §9.1): glibc's thresholds make freed large blocks reusable (measured as page faults in a
fresh process, against an untuned one), the thread rules, OpenMP's wait policy, and the pipeline
applying them without changing RecBole's model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_config

from recbole_popprior import openmp, runtime
from recbole_popprior.model.fast_kernels import erf_gelu_layers
from recbole_popprior.quick_start import build_config, build_pipeline

ROOT = Path(__file__).resolve().parent.parent


def _faults(tune: bool) -> list[int]:
    """Minor page faults of each of 12 rounds that allocate and free two 64 MB tensors, in a fresh process."""
    code = textwrap.dedent(f"""
        import resource, torch
        from recbole_popprior import runtime
        if {tune}:
            assert runtime.tune_allocator()
        x = torch.ones(16 * 2**20)
        out = []
        for _ in range(12):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            y = x * 2.0
            z = y + 1.0
            del y, z
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(*out)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(v) for v in proc.stdout.split()]


@pytest.mark.skipif(runtime.allocator_skip_reason() is not None, reason="glibc's malloc is not tunable here")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_them_in_again():
    pages = 2 * 64 * 2**20 // 4096  # two 64 MB tensors a round
    untuned, tuned = _faults(False), _faults(True)
    assert min(untuned[2:]) > 0.9 * pages, untuned  # glibc maps and unmaps every such block
    # tuned: after a few rounds (the heap settles) they come from it. Not every round: in about one run of
    # three a late round still faults one 64 MB block in (rounds 8 and 19 seen; the cause not found), so the
    # test asks that most late rounds fault nothing and that they fault under a quarter of glibc's default
    late, late_untuned = tuned[4:], untuned[4:]
    assert sum(f < 0.02 * pages for f in late) > len(late) / 2, tuned
    assert sum(late) < 0.25 * sum(late_untuned), (tuned, untuned)


def test_a_users_malloc_settings_are_left_alone():
    assert runtime.allocator_skip_reason({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX is set"
    assert runtime.allocator_skip_reason({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES is set"
    assert runtime.allocator_skip_reason({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"}) == "another allocator is preloaded"
    assert runtime.allocator_skip_reason({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) in (None, "not glibc")


def test_thread_rules(monkeypatch):
    current = runtime._THREADS_AT_IMPORT
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    assert runtime.intra_op_threads({"torch_threads": 3}, environ={}, current=current) == 3  # the key wins
    assert runtime.intra_op_threads({}, environ={"OMP_NUM_THREADS": "1"}, current=current) is None
    assert runtime.intra_op_threads({}, environ={}, current=current + 1) is None  # the program chose
    assert runtime.intra_op_threads({}, environ={}, current=current) == min(current, 4)  # never raised
    assert runtime.intra_op_threads({"worker": 3}, environ={}, current=current) == min(current, 1)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
    assert runtime.intra_op_threads({"worker": 2}, environ={}, current=current) == 1


def test_configure_threads_sets_the_key_and_one_inter_op_thread_in_a_fresh_process():
    code = ("import torch; from recbole_popprior import runtime; n = runtime.configure_threads({'torch_threads': 1}); "
            "print(n, torch.get_num_threads(), torch.get_num_interop_threads())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "1"]


def test_openmp_wait_policy_rules():
    env: dict[str, str] = {}
    assert openmp.set_wait_policy(env, modules=()) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(chosen)
        assert openmp.set_wait_policy(env, modules=()) is None and env == chosen
    env = {}
    assert openmp.set_wait_policy(env, modules={"torch": None}) is None and env == {}  # too late: torch is loaded


@pytest.mark.parametrize("first, expected", [("recbole_popprior", "PASSIVE"), ("torch", "None")])
def test_importing_the_package_first_sets_the_policy_before_torch_reads_it(first, expected):
    code = f"import os; os.environ.pop('OMP_WAIT_POLICY', None); import {first}; import recbole_popprior; " \
           "print(os.environ.get('OMP_WAIT_POLICY'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected


def test_the_pipeline_applies_the_runtime_and_swaps_nothing_by_default(tiny_data, tmp_path):
    """build_pipeline tunes the allocator (once per process) and leaves the test's one thread alone (the
    program chose it); without fast_* keys the model keeps RecBole's modules (tests/test_mixin.py checks
    that tau = 0 is then RecBole's model bit for bit)."""
    torch.set_num_threads(1)
    pipe = build_pipeline(build_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, fast_loader=False, output=str(tmp_path), prior_tau=0.0)), log=False)
    assert torch.get_num_threads() == 1
    assert runtime.tune_allocator() == (runtime.allocator_skip_reason() is None)
    assert any(type(m) is nn.Dropout for m in pipe.model.modules()) and erf_gelu_layers(pipe.model)
