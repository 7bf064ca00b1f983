"""Faster kernels swapped onto a built RecBole model, without forking RecBole (docs/DESIGN.md §11.2).

Each is a config key, off by default because it changes the numbers (a little):

- ``fast_gelu``: every feed-forward layer whose activation is RecBole's erf formula
  ``x * 0.5 * (1 + erf(x / sqrt 2))`` (``FeedForward.gelu``: SASRec, BERT4Rec, S3Rec, FDSA, ...,
  and FEARec's copy) gets ``torch.nn.functional.gelu``: the same function in one fused kernel
  instead of five element-wise passes; values and gradients differ by float rounding only.
- ``fast_dropout``: every ``nn.Dropout`` becomes :class:`FastDropout`. torch's CPU dropout draws
  its mask with a serial ``bernoulli_`` (about 30 ns per element); FastDropout draws random
  bytes in one vectorised pass and compares them with ``p``, then scales in one multiply. Each
  element is still kept independently with probability ``1 - p`` (exactly when ``p`` is a
  multiple of 2^-16, as RecBole's default 0.5; any other ``p`` is rounded to a multiple of
  2^-32), but the draws differ from torch's: a run is reproducible with itself, not with RecBole's.
- ``fast_last_position``: SASRec, SASRecF, GCSAN and FDSA read their transformer's last layer at
  the last real position only, yet RecBole runs that layer at all 50; the swapped encoder runs it
  for that one query per sequence (the keys and values still see every position). The output is
  the same up to float rounding; the last layer's dropout draws fewer elements, so the draws differ.
- ``fast_sparse_items`` (with sampled softmax only): the item table's lookups (the input
  sequence, the targets, the negatives) give a sparse gradient, so the backward pass and the
  optimiser touch only the rows of the batch (:mod:`recbole_popprior.optim`: lazy Adam, which is
  not Adam, see there).

:func:`apply_fast_kernels` is the one place that swaps them; the mixin calls it after RecBole has
built the model. What was swapped is logged in one line.
"""

from __future__ import annotations

from fractions import Fraction
from logging import getLogger
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recbole_popprior.model.registry import record_of

#: config keys of this module (defaults in properties/overall.yaml, all False)
FAST_KERNEL_KEYS = ("fast_gelu", "fast_dropout", "fast_last_position", "fast_sparse_items")
#: an attribute set on an item table's weight whose row lookups give sparse gradients
SPARSE_MARK = "_popprior_sparse_rows"


# --- GELU -------------------------------------------------------------------------------------------
def erf_gelu_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose activation is their own ``gelu`` method (RecBole's erf formula)."""
    found = []
    for module in model.modules():
        act = module.__dict__.get("intermediate_act_fn")
        if getattr(act, "__self__", None) is module and getattr(act, "__name__", "") == "gelu":
            found.append(module)
    return found


def swap_gelu(model: nn.Module) -> int:
    """``F.gelu`` (exact, erf-based) for RecBole's formula; returns how many layers changed."""
    layers = erf_gelu_layers(model)
    for module in layers:
        module.intermediate_act_fn = F.gelu
    return len(layers)


# --- dropout ----------------------------------------------------------------------------------------
def _mask_bits(p: float) -> int:
    """Random bits per element: 8 or 16 when ``p`` is a multiple of 2^-8 or 2^-16, else 32."""
    for bits in (8, 16):
        if (Fraction(p) * 2**bits).denominator == 1:
            return bits
    return 32


#: how the random words are read: bytes unsigned, wider chunks signed (torch has no uint16/uint32 compare)
_VIEWS = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor shaped like ``like``: each element ``True`` independently with probability
    ``1 - p`` (``p`` rounded to a multiple of 2^-32 at worst).

    Why not ``rand_like(x) >= p``: that draws one float per element; here one 64-bit word gives
    8 elements (``p`` a multiple of 1/256, as 0.5), 4 or 2, and the comparison is on integers.
    """
    bits = _mask_bits(p)
    threshold = round(p * 2**bits)  # an element is dropped when its bits, read unsigned, are below it
    if threshold >= 2**bits:  # p within 2^-33 of 1: every element is dropped
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    n = like.numel()
    words = -(-n * bits // 64)
    raw = torch.empty(words, dtype=torch.int64, device=like.device)
    raw.random_(-(2**63), None, generator=generator)  # the full 64-bit range: every byte uniform
    values = raw.view(_VIEWS[bits])[:n]
    if bits > 8:  # a signed view: the unsigned [0, 2^bits) shifted down by 2^(bits-1)
        threshold -= 2 ** (bits - 1)
    return (values >= threshold).view(like.shape)


class _KeepScale(torch.autograd.Function):
    """``x * keep * scale`` whose backward is ``grad * keep * scale`` (the bool mask is saved, 1 byte
    per element, instead of a float noise tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with a mask from :func:`keep_mask` (still an ``nn.Dropout``: ``isinstance``
    checks, ``p``, the train and eval modes and ``state_dict`` are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.inplace:
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _KeepScale.apply(x, keep_mask(x, self.p), 1.0 / (1.0 - self.p))


def swap_dropout(model: nn.Module) -> int:
    """Every plain ``nn.Dropout`` child becomes a :class:`FastDropout` with the same ``p``."""
    count = 0
    for module in model.modules():
        for name, child in list(module._modules.items()):
            if type(child) is nn.Dropout:
                module._modules[name] = FastDropout(child.p, child.inplace)
                module._modules[name].train(child.training)
                count += 1
    return count


# --- the last layer at the last position only ----------------------------------------------------
def _last_query_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      last: torch.Tensor) -> torch.Tensor:
    """RecBole's ``TransformerLayer`` (multi-head attention, then the feed-forward block) for one query
    per sequence, at position ``last[b]``; keys and values are every position of ``hidden``. ``[B, 1, d]``.

    The same submodules run in the same order as ``MultiHeadAttention.forward`` and
    ``FeedForward.forward``, on ``[B, 1, d]`` instead of ``[B, L, d]`` for everything after K and V.
    """
    attn = layer.multi_head_attention
    batch, length, width = hidden.shape
    x = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, width))  # [B, 1, d]
    heads, size = attn.num_attention_heads, attn.attention_head_size
    q = attn.query(x).view(batch, 1, heads, size).permute(0, 2, 1, 3)  # [B, h, 1, s]
    k = attn.key(hidden).view(batch, length, heads, size).permute(0, 2, 3, 1)  # [B, h, s, L]
    v = attn.value(hidden).view(batch, length, heads, size).permute(0, 2, 1, 3)  # [B, h, L, s]
    mask = attention_mask.gather(2, last.view(-1, 1, 1, 1).expand(-1, attention_mask.shape[1], 1, length))
    scores = torch.matmul(q, k) / attn.sqrt_attention_head_size + mask  # [B, h, 1, L]
    probs = attn.attn_dropout(attn.softmax(scores))
    context = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(batch, 1, attn.all_head_size)
    out = attn.LayerNorm(attn.out_dropout(attn.dense(context)) + x)
    return layer.feed_forward(out)


def last_position_forward(encoder: nn.Module) -> Any:
    """A ``forward`` for RecBole's ``TransformerEncoder`` whose last layer runs at each sequence's last
    real position only; its last output holds that row at every position (an ``expand``, no copy).

    Why it may: the models whose record names their encoders (SASRec, SASRecF, GCSAN, FDSA) read it at
    ``item_seq_len - 1`` only, and under their causal, right-padded mask that position is the number of
    keys the last query row may see, minus one, so the encoder finds it without being told.
    """

    def forward(hidden_states, attention_mask, output_all_encoded_layers=True):
        layers = list(encoder.layer)
        outputs = []
        for layer in layers[:-1]:
            hidden_states = layer(hidden_states, attention_mask)
            outputs.append(hidden_states)
        last = ((attention_mask[:, 0, -1, :] == 0).sum(-1) - 1).clamp_min(0)
        top = _last_query_layer(layers[-1], hidden_states, attention_mask, last)
        outputs.append(top.expand(-1, hidden_states.shape[1], -1))
        return outputs if output_all_encoded_layers else outputs[-1:]

    return forward


def last_position_encoders(model: nn.Module) -> list[nn.Module]:
    """The encoders the model's record names (``last_position_encoders``, :mod:`.registry`)."""
    record = record_of(model)
    return [getattr(model, attr) for attr in (record.last_position_encoders if record is not None else ())]


def swap_last_position(model: nn.Module) -> int:
    """:func:`last_position_forward` for the model's encoders; returns how many changed."""
    encoders = last_position_encoders(model)
    for encoder in encoders:
        encoder.forward = last_position_forward(encoder)
    return len(encoders)


# --- sparse item-table rows -------------------------------------------------------------------------
def item_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` as an embedding lookup; a sparse gradient when the table is marked
    (``fast_sparse_items``).

    Why not ``table[index]``: on a CPU with more than one thread its backward adds the rows of
    repeated indices with parallel atomic adds, in a different order on every run (the training
    loss then differs in the last bits from run to run); the embedding's backward is deterministic.
    """
    return F.embedding(index, table, sparse=bool(getattr(table, SPARSE_MARK, False)))


def sparse_items_refusal(model: nn.Module) -> str | None:
    """Why ``fast_sparse_items`` cannot apply to this built model, or ``None``.

    Only sampled softmax touches a few rows of the table: the full softmax (and the other
    objectives) use every row of it in every step, so a sparse gradient would be dense anyway.
    """
    if not getattr(getattr(model, "training_objective", None), "uses_few_item_rows", False):
        return "only sampled softmax (softmax_negatives > 0) uses a few rows of the item table per step"
    table = getattr(model, "item_embedding", None)
    if not isinstance(table, nn.Embedding) or table.max_norm is not None:
        return "its item table is not a plain nn.Embedding named item_embedding"
    return None


def mark_sparse_items(model: nn.Module) -> None:
    """The item table's lookups give sparse gradients: ``nn.Embedding.sparse`` for the model's own
    lookups, :data:`SPARSE_MARK` for the objective's (:func:`item_rows`)."""
    model.item_embedding.sparse = True
    setattr(model.item_embedding.weight, SPARSE_MARK, True)


def sparse_item_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters marked by :func:`mark_sparse_items` (empty when none)."""
    return [p for p in model.parameters() if getattr(p, SPARSE_MARK, False)]


# --- the one entry point ----------------------------------------------------------------------------
def apply_fast_kernels(model: nn.Module, config: Any) -> list[str]:
    """Swap in what ``config`` asks for (:data:`FAST_KERNEL_KEYS`); returns what changed, logged in
    one line. Call it once the model is built (its training objective too)."""

    def on(key: str) -> bool:
        return bool(config[key]) if key in config else False

    if getattr(model, "_popprior_fast_kernels", False):  # the mixin's models, then build_pipeline
        return []
    model._popprior_fast_kernels = True
    done = []
    if on("fast_gelu"):
        done.append(f"F.gelu in {swap_gelu(model)} feed-forward layer(s)")
    if on("fast_dropout"):
        done.append(f"FastDropout for {swap_dropout(model)} dropout layer(s)")
    if on("fast_last_position"):
        count = swap_last_position(model)
        if count:
            done.append(f"the last layer at the last position in {count} encoder(s)")
        else:
            getLogger().warning(f"fast_last_position has no effect for {type(model).__name__}: its record names "
                                "no encoder read at the last position only (last_position_encoders)")
    if on("fast_sparse_items"):
        reason = sparse_items_refusal(model)
        if reason is None:
            mark_sparse_items(model)
            done.append("sparse item-table gradients")
        else:
            getLogger().warning(f"fast_sparse_items has no effect for {type(model).__name__}: {reason}")
    if done:
        getLogger().info(f"fast kernels ({type(model).__name__}): " + "; ".join(done))
    return done


__all__ = ["apply_fast_kernels", "swap_last_position", "last_position_encoders", "last_position_forward", "FastDropout", "keep_mask", "swap_gelu", "swap_dropout", "erf_gelu_layers",
           "item_rows", "mark_sparse_items", "sparse_item_parameters", "sparse_items_refusal",
           "FAST_KERNEL_KEYS", "SPARSE_MARK"]
