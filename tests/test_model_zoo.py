# Over 500 lines: one cache of the whole zoo (29 models, each built once) serves every per-model check.
"""Prior separation across RecBole's sequential model zoo (DESIGN.md §1, §6.2), one tiny dataset.

For every supported model: a training step runs; the training loss equals a hand-computed
CE/NLL over the baseline's OWN logits plus ``tau * log p_hat`` (padding excluded), or for BPR
the baseline's own pair of scores each plus ``tau * log p_hat`` of its item; full-sort scores
move by exactly ``beta * log p_hat`` (log space for probability models); with ``tau = beta = 0``
the model is RecBole's own class (CE and BPR); ``popprior_factors`` reproduces the learned
scores; ``popprior_baseline`` runs every RecBole sequential model with RecBole's own
negative-sampling settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config, tiny_rows, write_inter

from recbole.utils import init_seed

from recbole_popprior import checkpoint
from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.data.synthetic import feature_and_kg_files
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import PriorSeparatedMixin, get_model, record_of, records, supported_models

ROOT = Path(__file__).resolve().parent.parent
N_ITEMS = 30
TAU = 0.8
PRIOR_KEYS = ("log_prior", "log_prior_windows", "prior_window_edges", "prior_tau")
PROBABILITY_MODELS = {"GRU4RecCPR", "SASRecCPR", "RepeatNet"}


# --- a tiny dataset with an item feature and a generated knowledge graph ---------------------
def write_zoo(root: Path, name: str = "zoo", n_users: int = 40) -> Path:
    """``name.inter`` (Zipf items), ``.item`` (a token_seq ``class``), and the KG files
    (``.kg``, ``.link``, ``.ent``/``.rel`` with 8-d pretrained embeddings) KSR/GRU4RecKG need."""
    folder = root / name
    write_inter(folder / f"{name}.inter", tiny_rows(n_users=n_users, n_items=N_ITEMS, length=10))
    rng = np.random.default_rng(1)
    files = feature_and_kg_files(N_ITEMS, rng)
    for suffix, lines in files.items():
        (folder / f"{name}.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


_KG = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "kg": ["head_id", "relation_id", "tail_id"],
                 "link": ["item_id", "entity_id"], "ent": ["ent_id", "ent_emb"], "rel": ["rel_id", "rel_emb"]},
    "additional_feat_suffix": ["ent", "rel"], "alias_of_entity_id": ["ent_id"],
    "alias_of_relation_id": ["rel_id"], "preload_weight": {"ent_id": "ent_emb", "rel_id": "rel_emb"},
    "kg_embedding_size": 8,
}
#: per-model settings the tiny data needs (RecBole defaults assume >= 100 items, >= 2 layers)
_EXTRA = {
    "FEARec": {"n_layers": 2},
    "SASRecCPR": {"reranker_CAN_NUM": "10"},
    "GRU4RecCPR": {"reranker_CAN_NUM": "10"},
    "GRU4RecKG": _KG,
    "KSR": _KG,
}


def zoo_config(name: str, data_path: Path, **overrides) -> dict:
    config = tiny_config(
        data_path, fast_loader=False, MAX_ITEM_LIST_LENGTH=6, train_batch_size=32,
        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "class"]},
        selected_features=["class"], item_attribute="class", prior_tau=TAU)
    config.update(_EXTRA.get(name, {}))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory) -> Path:
    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def s3rec_pretrained(zoo_data, tmp_path_factory) -> Path:
    """RecBole's S3Rec pretrain-stage model saved as a safe checkpoint (the format the plugin's
    trainer writes), so that both the plugin and RecBole's own S3Rec can fine-tune from it."""
    config = Config(model="S3Rec", dataset="zoo", config_dict=zoo_config(
        "S3Rec", zoo_data, train_stage="pretrain", popprior_baseline=True))
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(3, True)
    model = config.model_class(config, train_data._dataset)
    path = tmp_path_factory.mktemp("s3rec") / "S3Rec-zoo-1.pth"
    checkpoint.save_checkpoint(path, model, config=config)
    return path


class Zoo:
    """Plugin and baseline models of one RecBole model on the same data and seed."""

    def __init__(self, name: str, data_path: Path, pretrained: Path | None, **overrides):
        if name == "S3Rec":
            overrides = {"train_stage": "finetune", "pre_model_path": str(pretrained), **overrides}
        self.name = name
        self.config = Config(model=name, dataset="zoo", config_dict=zoo_config(name, data_path, **overrides))
        self.base_config = Config(model=name, dataset="zoo", config_dict=zoo_config(
            name, data_path, popprior_baseline=True, **overrides))
        dataset = create_dataset(self.config)
        self.train_data, self.valid_data, _ = data_preparation(self.config, dataset)
        for key, value in self.config.final_config_dict.items():  # keys RecBole's batch transforms add
            if key not in self.base_config.final_config_dict:
                self.base_config[key] = value
        self.dataset = self.train_data._dataset
        init_seed(11, True)
        self.train_batch = next(iter(self.train_data))
        self.eval_batch = next(iter(self.valid_data))[0]

    def plugin(self, **keys):
        saved = {key: self.config[key] for key in keys}
        for key, value in keys.items():
            self.config[key] = value
        try:
            init_seed(2020, True)
            model = self.config.model_class(self.config, self.dataset)
        finally:
            for key, value in saved.items():
                self.config[key] = value
        assert isinstance(model, PriorSeparatedMixin)
        return model

    def baseline(self):
        init_seed(2020, True)
        model = self.base_config.model_class(self.base_config, self.dataset)
        assert not isinstance(model, PriorSeparatedMixin)
        if self.name == "KSR":  # the same RecBole dtype bug the plugin fixes (special_cases._KSR)
            model.relation_Matrix = model.relation_Matrix.float()
        return model

    def loss(self, model) -> torch.Tensor:
        init_seed(5, True)
        return model.calculate_loss(self.train_batch)

    def scores(self, model) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model.full_sort_predict(self.eval_batch)


_CACHE: dict[str, Zoo] = {}


@pytest.fixture()
def zoo(request, zoo_data, s3rec_pretrained) -> Zoo:
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = Zoo(name, zoo_data, s3rec_pretrained)
    return _CACHE[name]


@pytest.fixture()
def bpr_zoo(request, zoo_data, s3rec_pretrained) -> Zoo:
    """The model trained with ``loss_type: BPR`` (FPMC and TransRec only have BPR)."""
    key = f"{request.param}-BPR"
    if key not in _CACHE:
        _CACHE[key] = Zoo(request.param, zoo_data, s3rec_pretrained, loss_type="BPR")
    return _CACHE[key]


MODELS = supported_models()
by_model = pytest.mark.parametrize("zoo", MODELS, indirect=True)
#: models whose RecBole class trains a softmax over the items (all but the BPR-only ones)
#: the BPR-only models (FPMC, TransRec) and those without a BPR loss, from their registry records
PAIRWISE_ONLY = [m for m in MODELS if record_of(get_model(m)).pairwise == "only"]
NO_PAIRWISE = [m for m in MODELS if record_of(get_model(m)).pairwise == "none"]
SOFTMAX_MODELS = [m for m in MODELS if m not in PAIRWISE_ONLY]
#: models whose RecBole class has a BPR loss (RecBole's test suite runs each with loss_type BPR)
BPR_MODELS = [m for m in MODELS if m not in NO_PAIRWISE]
by_bpr_model = pytest.mark.parametrize("bpr_zoo", BPR_MODELS, indirect=True)
#: models without an (H, E) factorisation of their learned score
NO_FACTORS = PROBABILITY_MODELS | {"TransRec"}


# --- capturing what the baseline passes to its softmax loss ----------------------------------
class _Recorder(nn.Module):
    """Stands in for a model's loss: records (input, target, kwargs) or returns given values."""

    def __init__(self, inner, replies: list | None = None):
        super().__init__()
        self.inner, self.calls, self.replies = inner, [], replies

    def forward(self, input, target, *args, **kwargs):
        self.calls.append((input.detach().double().clone(), target.clone(), kwargs))
        if self.replies is not None:
            return self.replies.pop(0)
        return self.inner(input, target, *args, **kwargs)


def _loss_options(inner, kwargs) -> tuple[str, int]:
    reduction = kwargs.get("reduction", getattr(inner, "reduction", "mean"))
    ignore_index = kwargs.get("ignore_index", getattr(inner, "ignore_index", -100))
    return reduction, ignore_index


def _run_with_loss(zoo: Zoo, model, replies: list | None = None, monkeypatch=None) -> tuple[torch.Tensor, list]:
    """Run ``model``'s training loss with its softmax loss replaced by a recorder."""
    if zoo.name == "BERT4Rec":  # a local nn.CrossEntropyLoss() built inside calculate_loss
        recorders: list[_Recorder] = []
        original = nn.CrossEntropyLoss

        def factory(*args, **kwargs):
            recorders.append(_Recorder(original(*args, **kwargs), replies))
            return recorders[-1]

        with monkeypatch.context() as patch:
            patch.setattr(nn, "CrossEntropyLoss", factory)
            loss = zoo.loss(model)
        assert len(recorders) == 1
        return loss, [(c, recorders[0].inner) for c in recorders[0].calls]
    recorder = _Recorder(model.loss_fct, replies)
    model.loss_fct = recorder
    loss = zoo.loss(model)
    return loss, [(c, recorder.inner) for c in recorder.calls]


def _reference_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: np.ndarray, tau: float,
                    reduction: str, ignore_index: int) -> torch.Tensor:
    """-log softmax(logits + tau log p_hat)[target] by hand (float64), padding column excluded."""
    z = logits.numpy()
    width = z.shape[1]
    prior = np.full(width, -np.inf)
    prior[: len(log_prior)] = log_prior
    keep = np.isfinite(prior)
    z = z[:, keep] + tau * prior[keep]
    cols = np.flatnonzero(keep)
    y = target.numpy().reshape(-1)
    # BERT4Rec pads its masked targets with item 0 and weights those rows by 0 afterwards
    valid = (y != ignore_index) & (y != 0)
    row = np.zeros(len(y))
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1)))
    pos = np.searchsorted(cols, y[valid])
    assert np.all(cols[pos] == y[valid]), "a target is the padding item"
    row[valid] = lse[valid] - z[valid][np.arange(valid.sum()), pos]
    if reduction == "none":
        return torch.tensor(row, dtype=torch.float32)
    if reduction == "sum":
        return torch.tensor(row.sum(), dtype=torch.float32)
    return torch.tensor(row[valid].mean(), dtype=torch.float32)


# --- the tests --------------------------------------------------------------------------------
def test_supported_models_are_the_issue_list_and_each_has_a_note():
    expected = {"SASRec", "SASRecF", "GRU4Rec", "GRU4RecF", "NARM", "STAMP", "Caser", "NextItNet", "SRGNN",
                "GCSAN", "FDSA", "FEARec", "LightSANs", "SHAN", "FOSSIL", "SINE", "HRM", "BERT4Rec", "S3Rec",
                "CORE", "HGN", "NPE", "GRU4RecCPR", "SASRecCPR", "RepeatNet", "GRU4RecKG", "KSR", "FPMC", "TransRec"}
    assert set(MODELS) == expected
    assert all(r.note for r in records())
    assert {r.name for r in records() if r.refused} == {"DIN", "DIEN"}
    assert {r.name for r in records()} == expected | {"DIN", "DIEN"}
    assert set(PAIRWISE_ONLY) == {"FPMC", "TransRec"}
    assert set(NO_PAIRWISE) == {"CORE", "GRU4RecCPR", "SASRecCPR", "RepeatNet"}
    assert {r.name for r in records() if r.supported and r.factors is None} == NO_FACTORS
    assert len(BPR_MODELS) == 25 and set(PAIRWISE_ONLY) <= set(BPR_MODELS)


def test_model_name_resolves_to_the_prior_separated_subclass(zoo_data):
    from recbole.model.sequential_recommender import NARM

    config = Config(model="NARM", dataset="zoo", config_dict=zoo_config("NARM", zoo_data))
    assert config.model_class is get_model("NARM")
    assert issubclass(config.model_class, NARM) and issubclass(config.model_class, PriorSeparatedMixin)
    assert config.model_class.__name__ == "NARM"


@by_model
def test_one_training_step_runs(zoo):
    model = zoo.plugin()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = zoo.loss(model)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert torch.isfinite(zoo.scores(model)[:, 1:]).all()


@pytest.mark.parametrize("zoo", SOFTMAX_MODELS, indirect=True)
def test_training_loss_is_ce_over_own_logits_plus_tau_log_prior(zoo, monkeypatch):
    model = zoo.plugin()
    model.train()
    loss = zoo.loss(model)
    baseline = zoo.baseline()
    baseline.train()
    _, calls = _run_with_loss(zoo, baseline, monkeypatch=monkeypatch)
    log_prior = model.log_prior.double().numpy()
    if zoo.name != "BERT4Rec":
        assert all((y != 0).all() for (_, y, _), _ in calls)
    replies = [_reference_loss(X, y, log_prior, TAU, *_loss_options(inner, kw)) for (X, y, kw), inner in calls]
    assert any(X.shape[1] in (N_ITEMS + 1, N_ITEMS + 2) for (X, _, _), _ in calls)
    # the baseline's own loss pipeline, with its softmax loss replaced by the hand-computed one
    expected, _ = _run_with_loss(zoo, zoo.baseline(), replies=replies, monkeypatch=monkeypatch)
    loss = loss.detach()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-5)
    assert abs(float(loss) - float(zoo.loss(baseline).detach())) > 1e-4  # the prior did change the loss


@by_model
def test_full_sort_scores_shift_by_beta_log_prior(zoo):
    model = zoo.plugin()
    log_prior = model.log_prior.double()
    model.prior_beta = 0.0
    s0 = zoo.scores(model).double()
    for beta in (0.7, -0.4):
        model.prior_beta = beta
        s1 = zoo.scores(model).double()
        if zoo.name in PROBABILITY_MODELS:  # softmax(log p + beta log p_hat): a per-row constant apart
            assert torch.allclose(s1.sum(dim=1), torch.ones(len(s1), dtype=s1.dtype), atol=1e-5)
            assert torch.all(s1[:, 0] == 0)
            shift = torch.log(s1[:, 1:]) - torch.log(s0[:, 1:]) - beta * log_prior[1:]
            shift = shift - shift.mean(dim=1, keepdim=True)
            assert shift.abs().max() < 1e-4
        else:
            assert torch.allclose(s1[:, 1:] - s0[:, 1:], beta * log_prior[1:].expand_as(s0[:, 1:]), atol=1e-5)
            assert torch.all(s1[:, 0] == -torch.inf)


def assert_is_recbole_own_model(zoo) -> None:
    """At tau = beta = 0 the plugin's model has RecBole's weights, loss and scores, bit for bit."""
    model = zoo.plugin(prior_tau=0.0, prior_beta=0.0)
    baseline = zoo.baseline()
    mine = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in PRIOR_KEYS}
    theirs = baseline.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    model.train()
    baseline.train()
    assert torch.equal(zoo.loss(model), zoo.loss(baseline))
    assert torch.equal(zoo.scores(model), zoo.scores(baseline))


@by_model
def test_tau_and_beta_zero_is_recbole_own_model(zoo):
    assert_is_recbole_own_model(zoo)


@by_model
def test_factors_reproduce_the_learned_scores(zoo):
    model = zoo.plugin()
    model.eval()
    with torch.no_grad():
        learned = model.popprior_learned_scores(zoo.eval_batch)
        parts = model.popprior_factors(zoo.eval_batch)
        served = model.full_sort_predict(zoo.eval_batch)
    if zoo.name in PROBABILITY_MODELS:
        assert parts is None
        assert torch.allclose(torch.softmax(learned + TAU * model.log_prior, dim=1), served, atol=1e-5)
        return
    if zoo.name in NO_FACTORS:  # a distance score: the energy metrics stream the learned scores
        assert parts is None
        assert torch.allclose(served[:, 1:], learned[:, 1:] + TAU * model.log_prior[1:], atol=1e-5)
        return
    H, E = parts
    assert E.shape[0] == N_ITEMS + 1 and H.shape == (len(learned), E.shape[1])
    assert torch.allclose(H @ E.T, learned, atol=1e-5, rtol=1e-5)
    assert torch.allclose(served[:, 1:], learned[:, 1:] + TAU * model.log_prior[1:], atol=1e-5)


def test_core_prior_is_outside_the_temperature(zoo_data, s3rec_pretrained, monkeypatch):
    zoo = _CACHE.get("CORE") or Zoo("CORE", zoo_data, s3rec_pretrained)
    model = zoo.plugin()
    model.eval()
    seen = _Recorder(model.loss_fct.inner)
    model.loss_fct.inner = seen
    zoo.loss(model)
    baseline = zoo.baseline()
    baseline.eval()
    _, calls = _run_with_loss(zoo, baseline, monkeypatch=monkeypatch)
    own = calls[0][0][0]  # cos / temperature, as RecBole computes it
    expected = own[:, 1:] + TAU * model.log_prior[1:].double()
    assert torch.allclose(seen.calls[0][0][:, 1:], expected, atol=1e-5)
    assert model.temperature != 1.0  # otherwise inside/outside would be indistinguishable


def test_s3rec_pretrain_then_finetune_uses_safe_checkpoints(zoo_data, tmp_path):
    from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test

    config = build_config("S3Rec", "zoo", config_dict=zoo_config(
        "S3Rec", zoo_data, train_stage="pretrain", pretrain_epochs=1, save_step=1, run_dir=str(tmp_path / "pre")))
    pipe = build_pipeline(config, log=False)
    assert not hasattr(pipe.model.loss_fct, "inner")  # no item softmax in pretraining: no prior
    pipe.trainer.fit(pipe.train_data, pipe.valid_data, saved=True, show_progress=False)
    saved = tmp_path / "pre" / "S3Rec-zoo-1.pth"
    assert saved.is_file()
    finetune = build_config("S3Rec", "zoo", config_dict=zoo_config(
        "S3Rec", zoo_data, train_stage="finetune", pre_model_path=str(saved), run_dir=str(tmp_path / "ft")))
    ft = build_pipeline(finetune, log=False)
    pretrained = pipe.model.state_dict()
    for key, value in ft.model.state_dict().items():
        if key.split(".")[0] not in PRIOR_KEYS:
            assert torch.equal(value, pretrained[key]), key
    record = train_and_test(ft, saved=True)
    assert np.isfinite(record["best_valid_score"])

    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(PopPriorError, match="cannot load checkpoint"):
        build_pipeline(finetune, log=False)


@pytest.mark.parametrize("name", sorted(NO_PAIRWISE))
def test_bpr_is_refused_with_one_line_where_recbole_has_none(zoo_data, name):
    """Refused by the config, before any data loads, and by the model's constructor."""
    with pytest.raises(PopPriorError, match=f"{name} cannot train with loss_type BPR") as info:
        Config(model=name, dataset="zoo", config_dict=zoo_config(name, zoo_data, loss_type="BPR"))
    assert "\n" not in str(info.value)
    config = Config(model=name, dataset="zoo", config_dict=zoo_config(name, zoo_data))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    config["loss_type"] = "BPR"
    with pytest.raises(PopPriorError, match=f"{name} cannot train with loss_type BPR"):
        config.model_class(config, train_data._dataset)


@pytest.mark.parametrize("model,reason", [("DIN", "click-through"), ("DIEN", "click-through")])
def test_unsupported_model_cli_exit_2_one_error_line(zoo_data, tmp_path, model, reason):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_recbole_popprior.py"), f"--model={model}", "--dataset=zoo",
         f"--data_path={zoo_data}", f"--output={tmp_path}", "--fast_loader=False"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert reason in lines[0] and "NARM" in lines[0] and "BERT4Rec" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# --- BPR: pairwise prior separation (DESIGN.md §6.2) ------------------------------------------
def _bpr_loss_attr(zoo: Zoo) -> str:
    return "bpr_loss" if zoo.name == "TransRec" else "loss_fct"


def _bpr_reference(pos: torch.Tensor, neg: torch.Tensor, pos_items: np.ndarray, neg_items: np.ndarray,
                   log_prior: np.ndarray, tau: float) -> torch.Tensor:
    """RecBole's BPRLoss of the two scores each plus tau log p_hat of its item, by hand (float64)."""
    pos, neg = pos.detach().double().numpy().reshape(-1), neg.detach().double().numpy().reshape(-1)
    d = (pos + tau * log_prior[pos_items]) - (neg + tau * log_prior[neg_items])
    return torch.tensor(-np.mean(np.log(1e-10 + 1.0 / (1.0 + np.exp(-d)))), dtype=torch.float32)


@by_bpr_model
def test_bpr_tau_and_beta_zero_is_recbole_own_model(bpr_zoo):
    assert bpr_zoo.config["train_neg_sample_args"]["distribution"] == "uniform"  # RecBole's own sampler
    assert_is_recbole_own_model(bpr_zoo)


@by_bpr_model
def test_bpr_loss_adds_tau_log_prior_to_each_score_of_the_pair(bpr_zoo):
    """The plugin's BPR loss = RecBole's BPR loss pipeline (regularisers included) with its pair of
    scores replaced by ``s + tau log p_hat(item)``, computed by hand from the baseline's own scores."""
    zoo = bpr_zoo
    model = zoo.plugin()
    log_prior = model.log_prior.double().numpy()
    pos_items = zoo.train_batch[model.POS_ITEM_ID].numpy()
    model.train()
    loss = float(zoo.loss(model).detach())
    baseline = zoo.baseline()
    baseline.train()
    if zoo.name == "BERT4Rec":  # inline BPR over the masked slots: compare in eval mode (no dropout)
        model.eval()
        baseline.eval()
        with torch.no_grad():
            loss = float(zoo.loss(model))
            batch = zoo.train_batch
            masked = batch[baseline.MASK_INDEX]
            H = baseline.forward(batch[baseline.MASK_ITEM_SEQ]).double()
            H = H.gather(1, masked.unsqueeze(-1).expand(-1, -1, H.shape[-1])).numpy()
            E = baseline.item_embedding.weight.double().numpy()
            bias = baseline.output_bias.double().numpy()
        pos, neg = batch[baseline.POS_ITEMS].numpy(), batch[baseline.NEG_ITEMS].numpy()
        keep = masked.numpy() > 0
        s_pos = (H * E[pos]).sum(-1) + bias[pos] + TAU * np.where(keep, log_prior[np.maximum(pos, 1)], 0.0)
        s_neg = (H * E[neg]).sum(-1) + bias[neg] + TAU * np.where(keep, log_prior[np.maximum(neg, 1)], 0.0)
        expected = -np.sum(np.log(1e-14 + 1.0 / (1.0 + np.exp(-(s_pos - s_neg)))) * keep) / keep.sum()
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
        return
    neg_items = zoo.train_batch[model.NEG_ITEM_ID].numpy()
    attr = _bpr_loss_attr(zoo)
    recorder = _Recorder(getattr(baseline, attr))
    setattr(baseline, attr, recorder)
    own = float(zoo.loss(baseline).detach())
    assert len(recorder.calls) == 1
    (pos, neg, _), = recorder.calls
    reply = _bpr_reference(pos, neg, pos_items, neg_items, log_prior, TAU)
    replay = zoo.baseline()
    replay.train()
    setattr(replay, attr, _Recorder(getattr(replay, attr), [reply]))
    expected = float(zoo.loss(replay).detach())
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(loss - own) > 1e-4  # the prior did change the loss


#: the sequential cases of RecBole's own test suite (tests/model/test_model_auto.py): each
#: model with its default loss, and with loss_type BPR where RecBole has it
_RECBOLE_CASES = [(m, {}) for m in MODELS] + [(m, {"loss_type": "BPR"}) for m in BPR_MODELS if m not in PAIRWISE_ONLY]


@pytest.mark.parametrize("name,overrides", _RECBOLE_CASES,
                         ids=[f"{m}{'-BPR' if o else ''}" for m, o in _RECBOLE_CASES])
def test_popprior_baseline_trains_every_recbole_sequential_model(name, overrides, zoo_data, s3rec_pretrained):
    """``popprior_baseline: True`` is RecBole's class on RecBole's data: no sampled negatives for a
    softmax (RecBole's suite passes ``train_neg_sample_args: None`` there), one uniform negative
    per row for BPR and for RepeatNet (which RecBole's suite runs with its defaults)."""
    if name == "S3Rec":
        overrides = {**overrides, "train_stage": "finetune", "pre_model_path": str(s3rec_pretrained)}
    config = Config(model=name, dataset="zoo", config_dict=zoo_config(name, zoo_data, popprior_baseline=True, **overrides))
    wants_negatives = "loss_type" in overrides or name in (*PAIRWISE_ONLY, "RepeatNet")
    assert config["train_neg_sample_args"]["distribution"] == ("uniform" if wants_negatives else "none")
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(2020, True)
    model = config.model_class(config, train_data._dataset)
    assert not isinstance(model, PriorSeparatedMixin)
    if name == "KSR":  # RecBole's own dtype bug (compat shim 7)
        model.relation_Matrix = model.relation_Matrix.float()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model.calculate_loss(next(iter(train_data)))
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
