"""Device-clean training and scoring, proven without a GPU (docs/DESIGN.md §9.1).

Each case builds the real model on CPU (the tiny zoo data of tests/test_model_zoo.py), moves the
model and a real batch to torch's ``meta`` device, and runs ``calculate_loss(...).backward()`` and
``full_sort_predict`` there, inside :class:`DeviceCheck`. A meta tensor has a shape and no data,
so:

- a host synchronisation fails by itself: ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
  ``.cpu()``, ``torch.nonzero`` and boolean-mask indexing (a data-dependent shape) all raise;
- a tensor created on the wrong device fails: :class:`DeviceCheck` sees every aten op and raises
  when a host tensor (more than a 0-d scalar, which CUDA also accepts) meets a device tensor, or is
  copied to the device inside the step (an implicit host-to-device copy: on CUDA both are either
  an error or a synchronising copy; torch's meta kernels alone accept some of them, e.g. a host
  index tensor).

Where a sync or a host tensor is truly needed it is in :data:`ALLOWED`, with the reason; an
allowed case must still fail, at the named place, so the list cannot go stale. Every other case
must run clean.
"""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from test_model_zoo import _CACHE, Zoo, s3rec_pretrained, zoo_data  # noqa: F401  (fixtures)

from recbole_popprior.model import get_model, record_of, supported_models

aten = torch.ops.aten
META = torch.device("meta")


class DeviceError(RuntimeError):
    """A host tensor met the device inside the step, or host data was copied to it."""


class DeviceCheck(TorchDispatchMode):
    """Fail on any op that mixes a ``meta`` tensor with a host tensor of more than one element,
    and on any copy between the host and ``meta`` (torch's meta kernels raise for syncs)."""

    _COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
               aten._copy_from_and_resize.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_meta = [t for t in tensors if t.device.type == "meta"]
        on_host = [t for t in tensors if t.device.type != "meta"]
        if func in self._COPIES:
            target = kwargs.get("device")
            moving = (target is not None and torch.device(target).type != tensors[0].device.type) or (
                len(on_meta) and len(on_host))
            if moving:
                raise DeviceError(f"{func}: a copy between the host and the device inside the step "
                                  f"(shapes {[tuple(t.shape) for t in tensors]})")
        elif on_meta and any(t.dim() > 0 for t in on_host):
            host = next(t for t in on_host if t.dim() > 0)
            raise DeviceError(f"{func}: a {host.device} tensor of shape {tuple(host.shape)} meets a device tensor")
        return func(*args, **kwargs)


#: (model, phase) -> (reason, where): a sync or a host tensor that is truly needed, and the function
#: (file name fragment, function name) in which the check must still fail, for every case of that
#: model and phase. All of them are RecBole 1.2.1's own code inside its models' ``forward`` or loss:
#: they cannot be removed without forking the model, and the plugin adds none. Nothing else may fail.
_SESSION_GRAPH = "builds each session graph with numpy on the host (item_seq.cpu().numpy()) in forward"
ALLOWED: dict[tuple[str, str], tuple[str, tuple[str, str]]] = {
    ("SRGNN", "train"): (_SESSION_GRAPH, ("srgnn.py", "_get_slice")),
    ("SRGNN", "score"): (_SESSION_GRAPH, ("srgnn.py", "_get_slice")),
    ("GCSAN", "train"): (_SESSION_GRAPH, ("gcsan.py", "_get_slice")),
    ("GCSAN", "score"): (_SESSION_GRAPH, ("gcsan.py", "_get_slice")),
    ("HRM", "train"): ("reverses every sequence with numpy on the host in forward", ("hrm.py", "inverse_seq_item")),
    ("HRM", "score"): ("reverses every sequence with numpy on the host in forward", ("hrm.py", "inverse_seq_item")),
    ("SHAN", "train"): ("makes a [B, 1] mask with torch.zeros on the host and copies it to the device in forward",
                        ("shan.py", "forward")),
    ("SHAN", "score"): ("makes a [B, 1] mask with torch.zeros on the host and copies it to the device in forward",
                        ("shan.py", "forward")),
    ("KSR", "train"): ("makes its user memory with torch.zeros on the host and copies it to the device in forward",
                       ("ksr.py", "memory_update")),
    ("KSR", "score"): ("makes its user memory with torch.zeros on the host and copies it to the device in forward",
                       ("ksr.py", "memory_update")),
    ("FDSA", "train"): ("its feature layer copies torch.FloatTensor([1e-8]) to the device in every forward "
                        "(mean pooling of token_seq features)", ("layers.py", "embed_token_seq_fields")),
    ("FDSA", "score"): ("its feature layer copies torch.FloatTensor([1e-8]) to the device in every forward "
                        "(mean pooling of token_seq features)", ("layers.py", "embed_token_seq_fields")),
    ("FEARec", "train"): ("its loss reads every target with .item() to look up sequences with the same target "
                          "(a Python loop over the batch)", ("fearec.py", "calculate_loss")),
    ("FEARec", "score"): ("builds its causal mask with torch.ones on the host and copies it in forward",
                          ("fearec.py", "get_attention_mask")),
    ("TransRec", "train"): ("RecBole's EmbLoss starts from torch.zeros(1) on the host, copied to the device at "
                            "every call", ("loss.py", "forward")),
}


def _allowed(name: str, case: str, phase: str) -> tuple[str, tuple[str, str]] | None:
    return ALLOWED.get((name, phase))


def _to_meta(interaction: Any) -> Any:
    return interaction.to(META)


#: plain (not parameter, not buffer) tensors that RecBole's classes create ON ``config["device"]`` at
#: construction, so ``model.to(device)`` does not move them: on a GPU run they start there; the harness
#: puts them on meta. Any other plain tensor attribute in a model fails the test.
RECBOLE_DEVICE_ATTRIBUTES = {
    "FeatureSeqEmbLayer": ("item_feat", "user_feat"),  # layers.py ~L1228: dataset features .to(self.device)
    "KSR": ("relation_Matrix",),  # ksr.py ~L92: torch.from_numpy(...).to(self.device)
}
#: plain tensors that RecBole's classes create on the host and leave there (on a GPU run too)
RECBOLE_HOST_ATTRIBUTES = {
    "FEARec": ("mask_default",),  # fearec.py ~L94: its contrastive mask (FEARec is allowed below anyway)
}


def _on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """``model.to(meta)``, plus what a model built with ``config["device"] = meta`` would have:
    RecBole's ``self.device`` (models call ``.to(self.device)`` in ``forward``) and the tensors
    of :data:`RECBOLE_DEVICE_ATTRIBUTES`."""
    model.to(META)
    for module in model.modules():
        if isinstance(module.__dict__.get("device"), (torch.device, str)):
            module.device = META
        moved = RECBOLE_DEVICE_ATTRIBUTES.get(type(module).__name__, ())
        for attr, value in list(module.__dict__.items()):
            if attr in moved and value is not None:
                setattr(module, attr, value.to(META))
            elif isinstance(value, torch.Tensor) and attr not in RECBOLE_HOST_ATTRIBUTES.get(type(module).__name__, ()):
                raise AssertionError(f"{type(module).__name__}.{attr} is a plain tensor attribute: "
                                     "model.to(device) does not move it")
    return model


def _zoo(name: str, data, pretrained, **overrides) -> Zoo:
    """The zoo of tests/test_model_zoo.py (shared cache: the same objects its tests built)."""
    key = name if not overrides else (f"{name}-BPR" if overrides == {"loss_type": "BPR"}
                                      else f"{name}-{sorted(overrides.items())}")
    if key not in _CACHE:
        _CACHE[key] = Zoo(name, data, pretrained, **overrides)
    return _CACHE[key]


def _run(zoo: Zoo, keys: dict[str, Any], phase: str):
    """Build the model on CPU, move it and a batch to meta, run ``phase`` inside the check."""
    model = zoo.plugin(**keys)
    _on_meta(model)
    if phase == "train":
        model.train()
        batch = _to_meta(zoo.train_batch)
        with DeviceCheck():
            loss = model.calculate_loss(batch)
            loss = sum(loss) if isinstance(loss, tuple) else loss
            assert loss.device == META and loss.dim() == 0
            loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None for g in grads)
        assert all(g is None or g.device == META for g in grads)
    else:
        model.eval()
        batch = _to_meta(zoo.eval_batch)
        with DeviceCheck(), torch.no_grad():
            scores = model.full_sort_predict(batch)
        assert scores.device == META and scores.shape[0] == len(zoo.eval_batch)


def _check(zoo: Zoo, name: str, case: str, keys: dict[str, Any], phase: str) -> None:
    allowed = _allowed(name, case, phase)
    if allowed is None:
        _run(zoo, keys, phase)
        return
    reason, (module, function) = allowed
    with pytest.raises((DeviceError, RuntimeError, NotImplementedError)) as info:
        _run(zoo, keys, phase)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(module in f.filename and f.name == function for f in frames), (
        f"{name} {case} {phase} failed elsewhere than the allowed {module}:{function} ({reason}): {info.value}")


# --- the cases ---------------------------------------------------------------------------------
MODELS = supported_models()
FACTORISED = [m for m in MODELS if record_of(get_model(m)).factorised_training_refusal() is None]
BPR = [m for m in MODELS if record_of(get_model(m)).pairwise == "optional"]  # ("only": BPR is the default loss)


@pytest.mark.parametrize("phase", ["train", "score"])
@pytest.mark.parametrize("name", MODELS)
def test_default_loss(name, phase, zoo_data, s3rec_pretrained):  # noqa: F811
    _check(_zoo(name, zoo_data, s3rec_pretrained), name, "default", {}, phase)


@pytest.mark.parametrize("name", BPR)
def test_bpr(name, zoo_data, s3rec_pretrained):  # noqa: F811
    _check(_zoo(name, zoo_data, s3rec_pretrained, loss_type="BPR"), name, "bpr", {}, "train")


@pytest.mark.parametrize("name", FACTORISED)
def test_sampled_softmax(name, zoo_data, s3rec_pretrained):  # noqa: F811
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    _check(zoo, name, "sampled", {"softmax_negatives": 8}, "train")


#: the prior's other code paths, and each remedy, on models whose paths differ
VARIANTS = [
    ("SASRec", "windowed", {"prior_mode": "windowed", "prior_windows": 3}, {}),
    ("SASRec", "learned", {}, {"prior_tau": "learned"}),
    ("SASRec", "windowed-learned-sampled", {"prior_mode": "windowed", "prior_windows": 3},
     {"prior_tau": "learned", "softmax_negatives": 8}),
    ("BERT4Rec", "windowed", {"prior_mode": "windowed", "prior_windows": 3}, {}),
    ("BERT4Rec", "windowed-learned-sampled", {"prior_mode": "windowed", "prior_windows": 3},
     {"prior_tau": "learned", "softmax_negatives": 8}),
    ("BERT4Rec", "windowed-bpr", {"prior_mode": "windowed", "prior_windows": 3, "loss_type": "BPR"}, {}),
    ("GRU4RecCPR", "learned", {}, {"prior_tau": "learned"}),
    ("NARM", "learned-bpr", {"loss_type": "BPR"}, {"prior_tau": "learned"}),
    ("SINE", "nll", {"loss_type": "NLL"}, {}),
    ("SASRec", "directspec", {}, {"prior_tau": 0.0, "remedy": "directspec"}),
    ("SASRec", "adap_tau", {}, {"prior_tau": 0.0, "remedy": "adap_tau"}),
    ("SASRec", "resn", {}, {"remedy": "resn"}),
    ("SASRec", "resn-identity-sampled", {}, {"remedy": "resn", "resn_link": "identity", "softmax_negatives": 8}),
    ("BERT4Rec", "directspec", {}, {"prior_tau": 0.0, "remedy": "directspec"}),
    ("BERT4Rec", "adap_tau", {}, {"prior_tau": 0.0, "remedy": "adap_tau"}),
    ("BERT4Rec", "resn", {}, {"remedy": "resn"}),
    ("CORE", "adap_tau", {}, {"prior_tau": 0.0, "remedy": "adap_tau"}),
]


@pytest.mark.parametrize("phase", ["train", "score"])
@pytest.mark.parametrize("name,case,data_keys,model_keys", VARIANTS, ids=[f"{v[0]}-{v[1]}" for v in VARIANTS])
def test_variant(name, case, data_keys, model_keys, phase, zoo_data, s3rec_pretrained):  # noqa: F811
    _check(_zoo(name, zoo_data, s3rec_pretrained, **data_keys), name, case, model_keys, phase)


@pytest.mark.parametrize("phase", ["train", "score"])
def test_ace_initialised_model(phase, zoo_data, s3rec_pretrained, tmp_path):  # noqa: F811
    zoo = _zoo("SASRec", zoo_data, s3rec_pretrained)
    n_items = zoo.dataset.item_num
    path = tmp_path / "table.npy"
    np.save(path, np.random.default_rng(0).standard_normal((n_items, 12)))
    _check(zoo, "SASRec", "ace", {"ace_init": str(path), "prior_tau": 0.0}, phase)


# --- the check can fail ---------------------------------------------------------------------------
def _sasrec(zoo_data, s3rec_pretrained):  # noqa: F811
    return _zoo("SASRec", zoo_data, s3rec_pretrained)


def test_a_planted_host_tensor_in_the_loss_path_fails(zoo_data, s3rec_pretrained, monkeypatch):  # noqa: F811
    """``torch.ones(n)`` without ``device=`` added to the training logits: caught."""
    from recbole_popprior.model import mixin

    zoo = _sasrec(zoo_data, s3rec_pretrained)
    _run(zoo, {}, "train")  # clean as it is
    original = mixin.PriorSeparatedMixin.add_training_prior

    def planted(self, logits, log_space=False):
        return original(self, logits, log_space) + torch.ones(logits.shape[-1])

    monkeypatch.setattr(mixin.PriorSeparatedMixin, "add_training_prior", planted)
    with pytest.raises((DeviceError, RuntimeError), match="cpu"):
        _run(zoo, {}, "train")


def test_a_planted_host_index_fails_where_meta_alone_would_not(zoo_data, s3rec_pretrained, monkeypatch):  # noqa: F811
    """A host index tensor into a device tensor (meta's kernels accept it; on CUDA it is a copy)."""
    from recbole_popprior.model import sampled_softmax

    zoo = _sasrec(zoo_data, s3rec_pretrained)
    assert (torch.ones(3, device=META)[torch.arange(2)]).device == META  # meta alone lets it through
    _run(zoo, {"softmax_negatives": 8}, "train")  # clean as it is
    monkeypatch.setattr(sampled_softmax.SampledSoftmax, "draw", lambda self: torch.arange(1, 9))
    with pytest.raises(DeviceError, match="meets a device tensor"):
        _run(zoo, {"softmax_negatives": 8}, "train")


@pytest.mark.parametrize("sync", ["item", "nonzero", "mask", "cpu"])
def test_a_planted_host_sync_fails(sync, zoo_data, s3rec_pretrained, monkeypatch):  # noqa: F811
    from recbole_popprior.model import sampled_softmax

    zoo = _sasrec(zoo_data, s3rec_pretrained)
    original = sampled_softmax.SampledSoftmax.loss
    plant = {
        "item": lambda loss: loss * float(loss),
        "nonzero": lambda loss: loss + torch.nonzero(loss.reshape(1) > 0).sum(),
        "mask": lambda loss: loss.reshape(1)[loss.reshape(1) > 0].sum(),
        "cpu": lambda loss: loss + loss.cpu().to(loss.device),
    }[sync]
    monkeypatch.setattr(sampled_softmax.SampledSoftmax, "loss", lambda self, model, batch: plant(
        original(self, model, batch)))
    with pytest.raises((DeviceError, RuntimeError, NotImplementedError)):
        _run(zoo, {"softmax_negatives": 8}, "train")
