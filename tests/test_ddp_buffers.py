"""DDP syncs only what it must (docs/DESIGN.md §9.3), with 2 gloo processes on CPU.

Each process builds the real pipeline (the plugin's ``Config`` joins the process group, RecBole's
trainer wraps the model in DDP through ``compat._ddp_any_device``), plants a different value in a
buffer on each rank and trains one epoch with RecBole's own training loop. Checked here, in the
parent process, from what the ranks saved:

- no buffer is re-sent from rank 0 by a step: each rank keeps its own planted values, while the
  parameters stay identical (DDP still all-reduces the gradients); and, as a control in the same
  processes, a wrapper with torch's default ``broadcast_buffers=True`` does overwrite them;
- Adap-tau's temperatures after the epoch are the same on both ranks and equal a single-process
  computation over the union of the rows both ranks trained on (DESIGN §7.2, §9.3).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, tiny_config, tiny_rows, write_inter

WORLD = 2


def _worker(rank: int, port: int, data: str, out: str) -> None:
    """One DDP process; writes ``out/rank<r>.pt`` (a plain dict of tensors)."""
    import recbole.trainer.trainer as recbole_trainer
    import torch.distributed as dist

    from recbole_popprior import collective
    from recbole_popprior.data import create_dataset, data_preparation
    from recbole_popprior.quick_start import build_config
    from recbole_popprior.trainer import get_trainer

    torch.set_num_threads(1)
    os.chdir(out)  # RecBole's trainer opens log_tensorboard/ under the working directory
    settings = tiny_config(data, fast_loader=False, prior_tau=0.0, remedy="adap_tau", adap_tau_warmup_epochs=0,
                           adap_tau_rho=0.5, local_rank=rank, nproc=WORLD, world_size=WORLD, port=port,
                           ddp_backend="gloo", run_dir=str(Path(out) / "run"), checkpoint_dir=str(Path(out) / "run"))
    config = build_config("SASRec", "tiny", config_dict=settings)
    try:
        dataset = create_dataset(config)
        train_data, _, _ = data_preparation(config, dataset)
        model = config.model_class(config, train_data._dataset)
        objective = model.training_objective
        model.register_buffer("planted", torch.ones(4))
        trainer = get_trainer(config)(config, model)  # DDP's construction may sync the buffers once
        model.planted.fill_(1.0 + rank)
        objective.t_user.fill_(1.0 + rank)  # a rank's own per-user state
        rows = []
        collect = objective._collect

        def spy(H, E, targets, users, plain, weights=None):
            rows.append((H.detach().clone(), E.detach().clone(), targets.clone(), users.clone(), plain.detach().clone()))
            return collect(H, E, targets, users, plain, weights)

        objective._collect = spy
        # RecBole's own epoch (without the plugin's epoch hook, which would recompute t_user first)
        recbole_trainer.Trainer._train_epoch(trainer, train_data, 0)
        after_step = {"planted": model.planted.clone(), "t_user": objective.t_user.clone()}
        params = collective.all_gather(collective.tensor_digest(
            torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
        table = model.item_embedding.weight.detach().clone()
        model.on_epoch_start(1)  # sums the epoch over the ranks, then the temperatures
        ddp = trainer.distributed_model
        result = {
            "broadcast_buffers": torch.tensor(bool(getattr(ddp, "forward_sync_buffers", getattr(
                ddp, "broadcast_buffers", True)))),
            "after_step": after_step, "params_equal": torch.tensor(len(set(params)) == 1),
            "t0": objective.t0.clone(), "t_user_epoch": objective.t_user.clone(), "table": table,
            "rows": rows, "train_users": train_data._dataset.inter_feat["user_id"].clone(),
            "n_users": torch.tensor(train_data._dataset.user_num),
        }
        # the control: torch's default wrapper re-sends rank 0's buffers at its forward (RecBole's
        # set_reduce_hook runs that forward once per step)
        default = torch.nn.parallel.DistributedDataParallel(model)  # (its construction syncs them once)
        model.planted.fill_(1.0 + rank)
        trainer.distributed_model = default
        trainer.set_reduce_hook()
        result["planted_default_ddp"] = model.planted.clone()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_buffers")
    data = root / "data"
    rows = [r for r in tiny_rows(n_users=60, length=12, seed=5) if r[2] % 1000 < 6 + r[0] % 7]  # uneven users
    write_inter(data / "tiny" / "tiny.inter", rows)
    mp.start_processes(_worker, args=(free_port(), str(data), str(root)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_a_step_does_not_overwrite_a_ranks_buffers(ranks):
    for rank, result in enumerate(ranks):
        assert not bool(result["broadcast_buffers"])
        assert torch.equal(result["after_step"]["planted"], torch.full((4,), 1.0 + rank))
        assert torch.all(result["after_step"]["t_user"] == 1.0 + rank)
        assert bool(result["params_equal"])  # the gradients were still all-reduced
        assert len(result["rows"]) >= 1
    # the control: torch's default DDP overwrites rank 1's buffer with rank 0's
    assert torch.equal(ranks[1]["planted_default_ddp"], torch.full((4,), 1.0))


def test_adap_tau_temperatures_are_the_single_process_ones_over_both_ranks_rows(ranks):
    from recbole_popprior.model.remedy_objectives import AdapTauObjective

    first = ranks[0]
    assert torch.equal(first["table"], ranks[1]["table"])
    for key in ("t0", "t_user_epoch"):
        assert torch.equal(first[key], ranks[1][key]), key
    users = [u for result in ranks for *_, u, _ in result["rows"]]
    assert len(set(torch.cat(users).tolist())) > 1
    # one process, one objective, every row of both ranks (DESIGN §7.2 on the whole epoch)
    single = AdapTauObjective(n_items=first["table"].shape[0] - 1, train_user_ids=first["train_users"],
                              n_users=int(first["n_users"]), rho=0.5, base="mean", active_quantile=0.2,
                              warmup_epochs=0, warmup_gap=0.7)
    for result in ranks:
        for H, E, targets, users_, plain in result["rows"]:
            single._collect(H, E, targets, users_, plain)  # each step's table, as the ranks' steps saw it
    single.epoch_last_E = first["table"]  # the table the last step left (the ranks hold it by reference)
    single.on_epoch_start(None, 1)
    assert float(single.t0) == pytest.approx(float(first["t0"]), rel=1e-10)
    torch.testing.assert_close(single.t_user, first["t_user_epoch"], rtol=1e-10, atol=0)
    # and not what either rank would have computed from its own rows alone
    alone = AdapTauObjective(n_items=first["table"].shape[0] - 1, train_user_ids=first["train_users"],
                             n_users=int(first["n_users"]), rho=0.5, base="mean", active_quantile=0.2,
                             warmup_epochs=0, warmup_gap=0.7)
    for H, E, targets, users_, plain in first["rows"]:
        alone._collect(H, E, targets, users_, plain)
    alone.epoch_last_E = first["table"]
    alone.on_epoch_start(None, 1)
    assert not torch.allclose(alone.t_user, first["t_user_epoch"])
