"""The popularity prior ``log p_hat`` (recbole_popprior/prior.py, docs/DESIGN.md §2): closed form,
padding, training targets only; windowed priors, where each training target uses its window's prior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.utils import init_seed
from torch import nn

from conftest import numpy_log_prior, tiny_config, window_of, write_inter

from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.prior import estimate_log_prior


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_estimate_log_prior_matches_closed_form(alpha):
    rng = np.random.default_rng(0)
    n_items = 12
    ids = rng.integers(0, n_items, size=500)  # includes padding 0, which must not count
    got = estimate_log_prior(ids, n_items, alpha).double().numpy()
    counts = np.array([(ids == i).sum() for i in range(1, n_items)], dtype=float)
    expected = np.log((counts + alpha) / (counts.sum() + alpha * (n_items - 1)))
    assert got[0] == -np.inf
    np.testing.assert_allclose(got[1:], expected, rtol=1e-6)
    assert np.exp(got[1:]).sum() == pytest.approx(1.0, abs=1e-6)


def test_unseen_items_get_the_smoothed_floor_and_torch_input_works():
    got = estimate_log_prior(torch.tensor([1, 1, 2]), 5, alpha=1.0).numpy()
    np.testing.assert_allclose(np.exp(got[1:]), [3 / 7, 2 / 7, 1 / 7, 1 / 7], rtol=1e-6)


@pytest.mark.parametrize("ids,n_items,alpha", [([1, 5], 5, 1.0), ([-1], 5, 1.0), ([1], 5, 0.0), ([1], 1, 1.0)])
def test_bad_prior_input_is_refused(ids, n_items, alpha):
    with pytest.raises(ValueError):
        estimate_log_prior(ids, n_items, alpha)


def test_model_prior_counts_training_targets_only(tmp_path):
    """The last two items of every user (its validation and test targets) are items that
    appear nowhere else: counting them would give those items N_i = 1 instead of 0."""
    rng = np.random.default_rng(3)
    n_users, length, n_common = 30, 8, 10
    rows, sequences = [], {}
    for u in range(1, n_users + 1):
        seq = [int(i) for i in rng.integers(1, n_common + 1, size=length)] + [100 + 2 * u, 101 + 2 * u]
        sequences[u] = seq
        rows += [(u, item, 1000 * u + t) for t, item in enumerate(seq)]
    write_inter(tmp_path / "held" / "held.inter", rows)
    config = Config(model="SASRec", dataset="held", config_dict=tiny_config(tmp_path, fast_loader=False, prior_alpha=0.5))
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = config.model_class(config, train_data._dataset)

    # closed form over the training targets: positions 2..length of each sequence (by token)
    tokens = [str(item) for seq in sequences.values() for item in seq[1:length]]
    n_items = dataset.item_num
    counts = np.zeros(n_items)
    for token in tokens:
        counts[dataset.token2id("item_id", token)] += 1
    expected = np.log((counts[1:] + 0.5) / (counts.sum() + 0.5 * (n_items - 1)))
    got = model.log_prior.double().numpy()
    assert got[0] == -np.inf
    np.testing.assert_allclose(got[1:], expected, rtol=1e-5)
    held_out = [dataset.token2id("item_id", str(seq[-k])) for seq in sequences.values() for k in (1, 2)]
    assert np.allclose(got[held_out], np.log(0.5 / (counts.sum() + 0.5 * (n_items - 1))))


# --- windowed priors ------------------------------------------------------------------------
TAU = 0.9


def _drifting_rows(n_users: int = 40, length: int = 10, n_items: int = 20, seed: int = 0) -> list[tuple]:
    """Early interactions favour items 1..5, late ones items 16..20 (global timestamps)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for t in range(length):
            time = float(rng.uniform(0, 1000)) if t else 0.0
            rows.append((u, time))
    rows.sort(key=lambda r: (r[0], r[1]))
    out = []
    for u, time in rows:
        hot = np.arange(1, 6) if time < 500 else np.arange(n_items - 4, n_items + 1)
        item = int(rng.choice(hot)) if rng.random() < 0.7 else int(rng.integers(1, n_items + 1))
        out.append((u, item, round(time, 3)))
    return out


def _stationary_rows(n_users: int, length: int, n_items: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    p /= p.sum()
    rows = []
    for u in range(1, n_users + 1):
        times = np.sort(rng.uniform(0, 1000, size=length))
        rows += [(u, int(i) + 1, round(float(t), 3)) for i, t in zip(rng.choice(n_items, size=length, p=p), times)]
    return rows


def _build(data_path: Path, name: str, model: str = "SASRec", **overrides):
    config = Config(model=model, dataset=name, config_dict=tiny_config(
        data_path, fast_loader=False, prior_tau=TAU, **overrides))
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    init_seed(2020, True)
    return config, train_data, valid_data, config.model_class(config, train_data._dataset)


@pytest.fixture(scope="module")
def drift_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drift")
    write_inter(root / "drift" / "drift.inter", _drifting_rows())
    return root


@pytest.mark.parametrize("by", ["time", "count"])
def test_window_priors_match_counts_per_window(drift_data, by):
    _, train_data, _, model = _build(drift_data, "drift", prior_mode="windowed", prior_windows=2, prior_window_by=by)
    feat = train_data._dataset.inter_feat
    ids, times = feat["item_id"].numpy(), feat["timestamp"].numpy().astype(float)
    window = window_of(times, times, 2, by)
    n_items = model.log_prior.shape[0]
    for t in range(2):
        np.testing.assert_allclose(model.log_prior_windows[t].double().numpy()[1:],
                                   numpy_log_prior(ids[window == t], n_items)[1:], rtol=1e-5)
    # the drift is real: early and late windows disagree on the popular items
    early = [train_data._dataset.token2id("item_id", str(k)) for k in range(1, 6)]
    assert model.log_prior_windows[0, early].mean() > model.log_prior_windows[1, early].mean() + 0.5


def test_each_target_gets_its_window_prior_in_the_logits(drift_data):
    _, train_data, _, model = _build(drift_data, "drift", prior_mode="windowed", prior_windows=2)
    seen = []
    inner = model.loss_fct.inner

    class Spy(nn.Module):
        def forward(self, logits, target):
            seen.append(logits.detach().double())
            return inner(logits, target)

    model.loss_fct.inner = Spy()
    model.eval()
    batch = next(iter(train_data))
    with torch.no_grad():
        model.calculate_loss(batch)
        H = model.forward(batch["item_id_list"], batch["item_length"])
        own = (H @ model.item_embedding.weight.T).double()
    feat_times = train_data._dataset.inter_feat["timestamp"].numpy().astype(float)
    window = window_of(batch["timestamp"].numpy().astype(float), feat_times, 2, "time")
    assert set(window) == {0, 1}, "the batch should hold targets of both windows"
    expected = own[:, 1:] + TAU * model.log_prior_windows.double()[torch.as_tensor(window)][:, 1:]
    assert torch.allclose(seen[0][:, 1:], expected, atol=1e-5)
    assert torch.all(seen[0][:, 0] == -torch.inf)


@pytest.mark.parametrize("serve,index", [(-1, 1), (0, 0)])
def test_serving_uses_the_configured_window(drift_data, serve, index):
    _, _, valid_data, model = _build(drift_data, "drift", prior_mode="windowed", prior_windows=2,
                                     prior_serve_window=serve)
    model.eval()
    batch = next(iter(valid_data))[0]
    with torch.no_grad():
        diff = model.full_sort_predict(batch) - model.popprior_learned_scores(batch)
    assert torch.allclose(diff[:, 1:], TAU * model.log_prior_windows[index, 1:].expand_as(diff[:, 1:]), atol=1e-5)


def test_bert4rec_masked_targets_use_their_own_interaction_time(drift_data, monkeypatch):
    """Rule (special_cases._BERT4Rec): a masked target uses the window of its own timestamp."""
    config, train_data, _, model = _build(drift_data, "drift", model="BERT4Rec", prior_mode="windowed",
                                          prior_windows=2, mask_ratio=0.5)
    model.eval()
    batch = next(iter(train_data))
    with torch.no_grad():
        loss = float(model.calculate_loss(batch))
        seq_output = model.forward(batch["Mask_item_id_list"])
    masked_index = batch["MASK_INDEX"]
    H = seq_output.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, seq_output.shape[-1])).reshape(-1, seq_output.shape[-1])
    logits = (H @ model.item_embedding.weight[: model.n_items].T + model.output_bias).double().detach().numpy()
    times = batch["timestamp_list"].gather(1, masked_index).reshape(-1).numpy().astype(float)
    train_times = train_data._dataset.inter_feat["timestamp"].numpy().astype(float)
    window = window_of(times, train_times, 2, "time")
    prior = model.log_prior_windows.double().numpy()[window]
    z = (logits + TAU * np.where(np.isfinite(prior), prior, 0))[:, 1:]
    y = batch["Pos_item_id"].reshape(-1).numpy()
    keep = masked_index.reshape(-1).numpy() > 0
    assert len(set(window[keep])) == 2, "masked targets of both windows are needed"
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    expected = np.mean((lse - z[np.arange(len(y)), np.maximum(y - 1, 0)])[keep])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_stationary_stream_gives_the_static_prior_up_to_smoothing(tmp_path):
    """i.i.d. items, so every window estimates the same p(i). With N_t targets in window t,
    |p_t(i) - p(i)| is below 5 standard errors sqrt(p(1-p)/N_t) plus the smoothing shift
    alpha * n / N_t (pseudo-counts move each estimate by at most that); and since CE is
    2-Lipschitz in the sup norm of its logits, the training losses differ by at most
    2 * tau * max |log p_t - log p|."""
    n_items, windows = 15, 4
    write_inter(tmp_path / "flat" / "flat.inter", _stationary_rows(400, 20, n_items, seed=5))
    _, train_data, _, static = _build(tmp_path, "flat", train_batch_size=512)
    _, _, _, windowed = _build(tmp_path, "flat", prior_mode="windowed", prior_windows=windows,
                               prior_window_by="count", train_batch_size=512)
    p = torch.exp(static.log_prior[1:]).double()
    n_t = len(train_data._dataset.inter_feat) / windows
    bound = 5 * torch.sqrt(p * (1 - p) / n_t) + 1.0 * n_items / n_t
    for t in range(windows):
        p_t = torch.exp(windowed.log_prior_windows[t, 1:]).double()
        assert torch.all((p_t - p).abs() <= bound)
    gap = float((windowed.log_prior_windows[:, 1:] - static.log_prior[1:]).abs().max())
    assert gap < 0.5
    batch = next(iter(train_data))
    static.eval()
    windowed.eval()
    with torch.no_grad():
        diff = abs(float(static.calculate_loss(batch)) - float(windowed.calculate_loss(batch)))
    assert diff <= 2 * TAU * gap
