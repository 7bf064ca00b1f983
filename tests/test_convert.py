# Over 500 lines: the converters' pure-Python reference and the checks against it stay in one file.
"""Raw-log converters: outputs and counts checked against a tiny pure-Python reference.

The reference below re-derives every expected row and count from the raw lines with plain
Python (``datetime`` for the alibaba clock, dicts for dedup and k-core), independently of the
converter's pyarrow/numpy code paths.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import zipfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from recbole_popprior.converters.cli import main
from recbole_popprior.converters import buckets as converters_buckets
from recbole_popprior.converters.pipeline import convert
from recbole_popprior.errors import PopPriorError

ROOT = Path(__file__).resolve().parent.parent
T0, T1 = 1511539200, 1512316799  # 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 UTC+8
TIANCHI_NAMES = ["pv", "buy", "cart", "fav"]
ALIBABA_NAMES = {1: "click", 2: "collect", 3: "cart", 4: "buy"}
BAD_KINDS = ["column_count", "encoding", "bad_id", "bad_time", "unknown_behavior"]
SMALL = {"block_bytes": 96, "rows_per_bucket": 25, "progress": False}  # many blocks, many buckets

# ----------------------------------------------------------------------------- generated logs


def tianchi_lines(seed: int = 0, n: int = 400, bad: bool = True) -> list[bytes]:
    """UserBehavior-shaped lines: ties, exact duplicates, out-of-window rows and bad rows."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        u, i = rng.randint(1, 25), rng.randint(1, 20)
        ts = rng.choice([rng.randint(T0, T1), rng.randint(T0, T0 + 50), rng.choice([T0 - 1, T1 + 1, 0, 2**31])])
        b = rng.choices(TIANCHI_NAMES, [6, 1, 1, 1])[0]
        lines.append(f"{u},{i},{i % 7 + 1},{b},{ts}".encode())
        if rng.random() < 0.15:  # an exact duplicate soon after
            lines.append(lines[rng.randrange(max(0, len(lines) - 5), len(lines))])
        if rng.random() < 0.1:  # same user and time, other item: order must follow the line
            lines.append(f"{u},{rng.randint(1, 20)},3,{b},{ts}".encode())
    if bad:
        lines[10:10] = [b"1,2,3,pv", b"1,2,3,pv,1511539300,9", b"x1,2,3,pv,1511539300", b"1,-2,3,pv,1511539300",
                        b"1,2,3,pv,15115x", b"1,2,3,click,1511539300", b"1,2,\xff\xfe,pv,1511539300",
                        b"3,4,5,PV,1511539300", b"", b"7,8,9,fav,1511539400\r"]
    return lines


def alibaba_lines(seed: int = 0, n: int = 400, bad: bool = True) -> list[bytes]:
    """tianchi_mobile_recommend_train_user-shaped lines (header first)."""
    rng = random.Random(seed)
    lines = [b"user_id,item_id,behavior_type,user_geohash,item_category,time"]
    for _ in range(n):
        u, i = rng.choice([10001082, 99512554, 5, 44, 103995979, 7]), rng.randint(1, 15) * 30000001  # ids > 2**28
        geo = rng.choice(["", "", "96cy6k3", "9r5gpbe"])
        t = datetime(2014, 11, 18) + timedelta(hours=rng.randint(0, 30 * 24 - 1))
        lines.append(f"{u},{i},{rng.choices([1, 2, 3, 4], [7, 1, 1, 1])[0]},{geo},{i % 4},{t:%Y-%m-%d %H}".encode())
        if rng.random() < 0.3:  # a third of the real rows are exact duplicates
            lines.append(lines[rng.randrange(max(1, len(lines) - 4), len(lines))])
        if rng.random() < 0.05:  # same row but another geohash: not a duplicate
            fields = lines[-1].split(b",")
            fields[3] = b"zzzzzzz" if fields[3] != b"zzzzzzz" else b""
            lines.append(b",".join(fields))
    if bad:
        lines[5:5] = [b"1,2,1,,3", b"1,2,1,,3,2014-12-01 10,7", b"abc,2,1,,3,2014-12-01 10", b"1,2,1,,3,2014-13-01 10",
                      b"1,2,1,,3,2014-02-30 10", b"1,2,1,,3,2014-12-01", b"1,2,9,,3,2014-12-01 10",
                      b"1,2,1,\xc3\x28,3,2014-12-01 10", b"1,2,0,,3,2014-12-01 10"]
    return lines


def write_log(path: Path, lines: list[bytes], trailing_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    return path


# ----------------------------------------------------------------------------- reference


def _int(text: str, signed: bool = False) -> int | None:
    return int(text) if re.fullmatch(r"-?\d+" if signed else r"\d+", text) and abs(int(text)) < 2**63 else None


def splitmix64(x: int) -> int:
    """SplitMix64's output for state ``x`` (Vigna's splitmix64.c), in plain Python integers."""
    z = (x + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def in_sample(user: int, fraction: float | None) -> bool:
    """The documented rule: keep the user iff splitmix64(id) < floor(fraction * 2**64)."""
    return fraction is None or splitmix64(user) < math.floor(Fraction(fraction) * 2**64)


def reference(kind: str, lines: list[bytes], behaviors: set[str], window: tuple, dedup: bool, k: int,
              sample: float | None = None) -> dict:
    """Expected rows (in output order) and counts, by brute force."""
    utc8 = timezone(timedelta(hours=8))
    body = lines[1:] if kind == "alibaba" else lines
    first = 2 if kind == "alibaba" else 1
    bad, rows, read, blank = Counter(), [], 0, 0
    for number, raw in enumerate(body, start=first):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            blank += 1
            continue
        read += 1
        try:
            fields = raw.decode("utf-8").split(",")
        except UnicodeDecodeError:
            bad["encoding"] += 1
            continue
        if len(fields) != (5 if kind == "tianchi" else 6):
            bad["column_count"] += 1
            continue
        if kind == "tianchi":
            u, i, c, b, t = fields
            ids = [_int(u), _int(i), _int(c)]
            ts = _int(t, signed=True)
            name = b if b in TIANCHI_NAMES else None
            key = tuple(fields)
        else:
            u, i, b, g, c, t = fields
            ids = [_int(u), _int(i), _int(c)]
            try:
                ts = int(datetime.strptime(t, "%Y-%m-%d %H").replace(tzinfo=utc8).timestamp()) \
                    if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d", t) else None
            except ValueError:
                ts = None
            name = ALIBABA_NAMES.get(_int(b) or 0)
            key = tuple(fields)
        if None in ids:
            bad["bad_id"] += 1
        elif ts is None:
            bad["bad_time"] += 1
        elif name is None:
            bad["unknown_behavior"] += 1
        else:
            rows.append({"user": ids[0], "item": ids[1], "cat": ids[2], "ts": ts, "b": name, "line": number, "key": key})
    dropped = Counter()
    lo, hi = window
    kept = []
    for r in rows:
        if (lo is not None and r["ts"] < lo) or (hi is not None and r["ts"] > hi):
            dropped["out_of_window"] += 1
        elif r["b"] not in behaviors:
            dropped["behavior"] += 1
        elif not in_sample(r["user"], sample):
            dropped["sample_users"] += 1
        else:
            kept.append(r)
    if dedup:
        seen, unique = set(), []
        for r in kept:
            if r["key"] in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(r["key"])
                unique.append(r)
        kept = unique
    if k > 1:
        while True:
            users = Counter(r["user"] for r in kept)
            items = Counter(r["item"] for r in kept)
            core = [r for r in kept if users[r["user"]] >= k and items[r["item"]] >= k]
            if len(core) == len(kept):
                break
            dropped["k_core"] += len(kept) - len(core)
            kept = core
    kept.sort(key=lambda r: (r["user"], r["ts"], r["line"]))
    text = "user_id:token\titem_id:token\ttimestamp:float\tbehavior_type:token\tcategory_id:token\n"
    text += "".join(f"{r['user']}\t{r['item']}\t{r['ts']}\t{r['b']}\t{r['cat']}\n" for r in kept)
    return {"text": text, "rows_read": read, "rows_kept": len(kept), "bad": bad, "dropped": dropped,
            "blank": blank, "users": len({r["user"] for r in kept}), "items": len({r["item"] for r in kept}),
            "ts": (min(r["ts"] for r in kept), max(r["ts"] for r in kept)) if kept else None}


def check(summary: dict, out: Path, name: str, ref: dict) -> None:
    data = (out / name / f"{name}.inter").read_bytes()
    assert data.decode() == ref["text"]
    saved = json.loads((out / name / f"{name}.summary.json").read_text())
    assert (saved["inter_bytes"], saved["inter_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert saved["rows_kept"] == summary["rows_kept"] == ref["rows_kept"]
    assert saved["rows_read"] == ref["rows_read"]
    assert saved["bad_rows"] == {k: ref["bad"][k] for k in BAD_KINDS}
    for reason in ("out_of_window", "behavior", "sample_users", "duplicate", "k_core"):
        assert saved["dropped"][reason] == ref["dropped"][reason], reason
    assert saved["dropped"]["bad_rows"] == sum(ref["bad"].values())
    assert saved["blank_lines"] == ref["blank"]
    assert (saved["users"], saved["items"]) == (ref["users"], ref["items"])
    assert (saved["time_span"]["min"], saved["time_span"]["max"]) == ref["ts"]
    d = saved["dropped"]
    assert saved["rows_read"] == saved["rows_kept"] + sum(d.values())
    assert not [p for p in (out / name).iterdir() if p.name.startswith(".")], "temporary files left behind"


# ----------------------------------------------------------------------------- matches the reference


@pytest.mark.parametrize("options, behaviors, window, dedup, k", [
    ({}, {"pv"}, (T0, T1), True, 0),
    ({"behaviors": "all", "dedup": False}, set(TIANCHI_NAMES), (T0, T1), False, 0),
    ({"behaviors": "pv,cart", "k_core": 3}, {"pv", "cart"}, (T0, T1), True, 3),
    ({"start": "2017-11-25 00:00:20", "end": "2017-11-30"}, {"pv"}, (T0 + 20, T0 + 6 * 86400 - 1), True, 0),
    ({"start": 0, "end": 2**31}, {"pv"}, (0, 2**31), True, 0),
])
def test_tianchi_output_and_counts_match_reference(tmp_path, options, behaviors, window, dedup, k):
    lines = tianchi_lines()
    src = write_log(tmp_path / "UserBehavior.csv", lines)
    summary = convert("tianchi", src, tmp_path / "out", **options, **SMALL)
    check(summary, tmp_path / "out", "tianchi", reference("tianchi", lines, behaviors, window, dedup, k))


@pytest.mark.parametrize("options, behaviors, dedup, k", [
    ({}, {"click"}, True, 0),
    ({"behaviors": "1,cart,4", "dedup": False}, {"click", "cart", "buy"}, False, 0),
    ({"behaviors": "all", "k_core": 4, "name": "ali"}, set(ALIBABA_NAMES.values()), True, 4),
])
def test_alibaba_output_and_counts_match_reference(tmp_path, options, behaviors, dedup, k):
    lines = alibaba_lines()
    src = write_log(tmp_path / "tianchi_mobile_recommend_train_user.csv", lines)
    summary = convert("alibaba", src, tmp_path / "out", **options, **SMALL)
    name = options.get("name", "alibaba")
    check(summary, tmp_path / "out", name, reference("alibaba", lines, behaviors, (None, None), dedup, k))


def test_default_block_and_bucket_sizes_give_the_same_output(tmp_path):
    lines = tianchi_lines(seed=3, n=3000, bad=False)
    src = write_log(tmp_path / "UserBehavior.csv", lines)
    convert("tianchi", src, tmp_path / "a", progress=False, behaviors="all")
    convert("tianchi", src, tmp_path / "b", behaviors="all", workers=1, **SMALL)
    text = (tmp_path / "a/tianchi/tianchi.inter").read_bytes()
    assert text == (tmp_path / "b/tianchi/tianchi.inter").read_bytes()
    assert text.decode() == reference("tianchi", lines, set(TIANCHI_NAMES), (T0, T1), True, 0)["text"]


def test_rows_are_ordered_by_numeric_user_then_time_then_line(tmp_path):
    lines = [b"10,1,1,pv,1511539300", b"9,5,1,pv,1511539400", b"9,7,1,pv,1511539300", b"9,6,1,pv,1511539300",
             b"100,1,1,pv,1511539200", b"9,2,1,pv,1511539300"]
    src = write_log(tmp_path / "u.csv", lines)
    convert("tianchi", src, tmp_path / "out", progress=False)
    rows = [line.split("\t")[:3] for line in (tmp_path / "out/tianchi/tianchi.inter").read_text().splitlines()[1:]]
    assert rows == [["9", "7", "1511539300"], ["9", "6", "1511539300"], ["9", "2", "1511539300"],
                    ["9", "5", "1511539400"], ["10", "1", "1511539300"], ["100", "1", "1511539200"]]


def test_k_core_matches_brute_force_on_random_pairs():
    rng = random.Random(7)
    pairs = sorted((rng.randint(1, 40), int(rng.paretovariate(0.8))) for _ in range(500))
    users = converters_buckets.dense_users(np.array([u for u, _ in pairs]), 0)
    index = converters_buckets.ItemIndex(2**40)
    index.add(np.array([i for _, i in pairs]) * 1000003)
    items = index.finish()
    assert not index.direct
    keep = converters_buckets.k_core(users, items, 5)
    alive = list(range(len(pairs)))
    while True:
        users = Counter(pairs[r][0] for r in alive)
        items = Counter(pairs[r][1] for r in alive)
        core = [r for r in alive if users[pairs[r][0]] >= 5 and items[pairs[r][1]] >= 5]
        if core == alive:
            break
        alive = core
    assert sorted(np.flatnonzero(keep).tolist()) == alive
    assert 0 < len(alive) < len(pairs)


# ----------------------------------------------------------------------------- --sample-users


@pytest.mark.parametrize("kind, options, behaviors, dedup, k, fraction", [
    ("tianchi", {}, {"pv"}, True, 0, 0.5),
    ("tianchi", {"behaviors": "all", "dedup": False, "k_core": 2}, set(TIANCHI_NAMES), False, 2, 0.3),
    ("alibaba", {"behaviors": "all"}, set(ALIBABA_NAMES.values()), True, 0, 0.5),
])
def test_sample_users_keeps_exactly_the_users_hashed_below_the_fraction(tmp_path, kind, options, behaviors,
                                                                        dedup, k, fraction):
    lines = tianchi_lines(seed=11) if kind == "tianchi" else alibaba_lines(seed=11)
    src = write_log(tmp_path / "log.csv", lines)
    summary = convert(kind, src, tmp_path / "out", sample_users=fraction, **options, **SMALL)
    window = (T0, T1) if kind == "tianchi" else (None, None)
    ref = reference(kind, lines, behaviors, window, dedup, k, sample=fraction)
    check(summary, tmp_path / "out", kind, ref)
    full = reference(kind, lines, behaviors, window, dedup, 0)
    assert 0 < ref["users"] < full["users"] and ref["dropped"]["sample_users"] > 0  # a real subset
    assert summary["options"]["sample_users"] == fraction


def test_user_hash_is_splitmix64_with_its_published_outputs():
    from recbole_popprior.converters.sample import user_hash

    # SplitMix64 seeded with 0 outputs mix(G), mix(2G), ...; user_hash(x) is mix(x + G)
    gamma = 0x9E3779B97F4A7C15
    states = np.array([0, gamma, 2 * gamma % 2**64], dtype=np.uint64).view(np.int64)
    assert user_hash(states).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    ids = [0, 1, 7, 2**31, 988_000, 2**63 - 1]
    assert user_hash(np.array(ids)).tolist() == [splitmix64(x) for x in ids]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_kept_share_of_many_users_is_within_a_binomial_bound(fraction):
    from recbole_popprior.converters.sample import keep_users

    n = 1_000_000
    bound = 5 * math.sqrt(n * fraction * (1 - fraction))  # 5 sigma: a false alarm about once in 3.5M
    for ids in (np.arange(1, n + 1), np.arange(n) * 1024, np.arange(n) * 1_000_003 + 10**12):
        kept = keep_users(ids, fraction)
        assert abs(int(kept.sum()) - fraction * n) < bound
        assert abs(int(kept[: n // 2].sum()) - fraction * n / 2) < bound  # no drift along the ids
    assert not (keep_users(np.arange(n), fraction) & ~keep_users(np.arange(n), min(1.0, fraction * 2))).any()


def test_sample_is_the_same_whatever_block_size_workers_order_or_compression(tmp_path):
    rng = random.Random(12)
    lines = [f"{rng.randint(1, 2000)},{rng.randint(1, 50)},3,pv,{rng.randint(T0, T1)}".encode() for _ in range(4000)]
    src = write_log(tmp_path / "u.csv", lines)
    shuffled = lines[:]
    rng.shuffle(shuffled)
    write_log(tmp_path / "s.csv", shuffled)
    (tmp_path / "u.csv.gz").write_bytes(gzip.compress(src.read_bytes()))
    runs = {"default": (src, {"progress": False}), "small blocks, 1 worker": (src, {**SMALL, "workers": 1}),
            "4 workers": (src, {"block_bytes": 512, "workers": 4, "progress": False}),
            "gzip": (tmp_path / "u.csv.gz", SMALL), "shuffled": (tmp_path / "s.csv", SMALL)}
    outputs = {}
    for label, (path, options) in runs.items():
        out = tmp_path / label.replace(" ", "_").replace(",", "")
        convert("tianchi", path, out, sample_users=0.25, **options)
        outputs[label] = (out / "tianchi/tianchi.inter").read_text().splitlines()
    ref = reference("tianchi", lines, {"pv"}, (T0, T1), True, 0, sample=0.25)["text"].splitlines()
    for label, rows in outputs.items():
        if label == "shuffled":  # same rows; only ties of (user, time) may be in another line order
            assert sorted(rows) == sorted(ref), label
        else:
            assert rows == ref, label
    users = {int(r.split("\t")[0]) for r in ref[1:]}
    assert users == {u for u in range(1, 2001) if in_sample(u, 0.25)} & {int(x.split(b",")[0]) for x in lines}


def test_sample_users_one_keeps_everything_and_bad_fractions_are_refused(tmp_path):
    src = write_log(tmp_path / "u.csv", tianchi_lines(seed=13, bad=False))
    convert("tianchi", src, tmp_path / "all", sample_users=1.0, progress=False)
    convert("tianchi", src, tmp_path / "none", progress=False)
    assert (tmp_path / "all/tianchi/tianchi.inter").read_bytes() == (tmp_path / "none/tianchi/tianchi.inter").read_bytes()
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "abc", True, [0.5]):
        with pytest.raises(PopPriorError, match=r"--sample-users must be a fraction in \(0, 1\]"):
            convert("tianchi", src, tmp_path / "bad", sample_users=bad, progress=False)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- output pair


def describes(summary_path: Path) -> bool:
    """Does this summary describe the .inter beside it? (size, SHA-256 and row count, by hand)"""
    summary = json.loads(summary_path.read_text())
    inter = summary_path.parent / summary_path.name.replace(".summary.json", ".inter")
    if not inter.exists():
        return False
    data = inter.read_bytes()
    return (summary["rows_kept"], summary.get("inter_bytes"), summary.get("inter_sha256")) == \
        (data.count(b"\n") - 1, len(data), hashlib.sha256(data).hexdigest())


def test_summary_identifies_its_inter_and_verify_output_checks_it(tmp_path):
    from recbole_popprior.converters.commit import verify_output

    src = write_log(tmp_path / "u.csv", tianchi_lines(seed=14, bad=False))
    summary = convert("tianchi", src, tmp_path / "out", progress=False)
    inter = tmp_path / "out/tianchi/tianchi.inter"
    assert describes(tmp_path / "out/tianchi/tianchi.summary.json")
    assert verify_output(inter) == json.loads((tmp_path / "out/tianchi/tianchi.summary.json").read_text())
    assert verify_output(inter)["inter_sha256"] == summary["inter_sha256"]
    lines = inter.read_bytes().splitlines(keepends=True)
    inter.write_bytes(b"".join(lines[:1] + lines[2:] + lines[1:2]))  # same size, other content
    with pytest.raises(PopPriorError, match="does not describe"):
        verify_output(inter)
    (tmp_path / "out/tianchi/tianchi.summary.json").unlink()
    with pytest.raises(PopPriorError, match="no summary"):
        verify_output(inter)


@pytest.mark.parametrize("stop_at", [1, 2])
def test_interrupt_at_the_commit_point_never_leaves_a_summary_beside_another_inter(tmp_path, monkeypatch, capsys,
                                                                                   stop_at):
    """An older pair from another input exists; the new run is stopped at its 1st or 2nd rename
    into place (the two renames of the commit). Whatever is left, no summary may describe
    anything but the .inter beside it, and the last line must say what was left."""
    out = tmp_path / "out"
    old = write_log(tmp_path / "old.csv", tianchi_lines(seed=15, n=100, bad=False))
    convert("tianchi", old, out, progress=False)
    old_inter = (out / "tianchi/tianchi.inter").read_bytes()
    lines = tianchi_lines(seed=16, bad=False)
    src = write_log(tmp_path / "new.csv", lines)
    new_text = reference("tianchi", lines, {"pv"}, (T0, T1), True, 0)["text"].encode()
    real_replace, calls = os.replace, []

    def replace_then_stop(a, b, **kwargs):
        calls.append(Path(b).name)
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # as a Ctrl-C (or SIGKILL) exactly at this rename
        return real_replace(a, b, **kwargs)

    monkeypatch.setattr(os, "replace", replace_then_stop)
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(out)], capsys)
    monkeypatch.undo()
    assert code == 130 and len(err.strip().splitlines()) == 1 and err.startswith("error: interrupted")
    summary = out / "tianchi/tianchi.summary.json"
    assert not summary.exists() or describes(summary)
    inter = (out / "tianchi/tianchi.inter").read_bytes()
    assert inter in (old_inter, new_text)  # never a mix
    if inter == new_text:
        assert "not its summary" in err
    else:
        assert "no output written" in err
    assert not [p for p in (out / "tianchi").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("stop_at", [1, 2])
def test_sigkill_at_the_commit_point_never_leaves_a_summary_beside_another_inter(tmp_path, stop_at):
    """The same with SIGKILL, where no clean-up code runs at all."""
    out = tmp_path / "out"
    convert("tianchi", write_log(tmp_path / "old.csv", tianchi_lines(seed=21, n=100, bad=False)), out, progress=False)
    old_inter = (out / "tianchi/tianchi.inter").read_bytes()
    lines = tianchi_lines(seed=22, bad=False)
    src = write_log(tmp_path / "new.csv", lines)
    _sigkill_at_rename(tmp_path, src, out, stop_at)
    summary = out / "tianchi/tianchi.summary.json"
    assert not summary.exists() or describes(summary)
    new_text = reference("tianchi", lines, {"pv"}, (T0, T1), True, 0)["text"].encode()
    assert (out / "tianchi/tianchi.inter").read_bytes() == (old_inter if stop_at == 1 else new_text)


def test_a_later_run_replaces_an_older_pair_whole(tmp_path):
    out = tmp_path / "out"
    convert("tianchi", write_log(tmp_path / "a.csv", tianchi_lines(seed=17, bad=False)), out, progress=False)
    lines = tianchi_lines(seed=18, n=150, bad=False)
    convert("tianchi", write_log(tmp_path / "b.csv", lines), out, progress=False)
    assert describes(out / "tianchi/tianchi.summary.json")
    assert (out / "tianchi/tianchi.inter").read_text() == reference("tianchi", lines, {"pv"}, (T0, T1), True, 0)["text"]


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "summary"])
def test_output_that_would_replace_the_input_is_refused(tmp_path, how):
    data = b"\n".join(tianchi_lines(seed=19, bad=False)) + b"\n"
    (tmp_path / "d/tianchi").mkdir(parents=True)
    target = tmp_path / "d/tianchi" / ("tianchi.summary.json" if how == "summary" else "tianchi.inter")
    target.write_bytes(data)
    src = target
    if how in ("symlink", "hard link"):
        src = tmp_path / "raw.csv"
        (src.symlink_to if how == "symlink" else src.hardlink_to)(target)
    with pytest.raises(PopPriorError, match="would overwrite the input"):
        convert("tianchi", src, tmp_path / "d", progress=False)
    assert target.read_bytes() == data and sorted(p.name for p in (tmp_path / "d/tianchi").iterdir()) == [target.name]


# ----------------------------------------------------------------------------- standard streams


def test_closed_stdout_is_quiet_and_the_output_is_complete(tmp_path):
    lines = tianchi_lines(seed=20, bad=False)
    src = write_log(tmp_path / "u.csv", lines)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -0`: every write to stdout fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "recbole_popprior.convert", "tianchi", "--input", str(src),
                               "--output", str(tmp_path / "out"), "--no-progress"], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == b""
    assert (tmp_path / "out/tianchi/tianchi.inter").read_text() == reference("tianchi", lines, {"pv"}, (T0, T1),
                                                                                True, 0)["text"]
    assert describes(tmp_path / "out/tianchi/tianchi.summary.json")


# ----------------------------------------------------------------------------- inputs


def test_gz_and_zip_inputs_give_the_same_output_as_csv(tmp_path):
    lines = alibaba_lines(seed=1)
    raw = b"\n".join(lines) + b"\n"
    plain = tmp_path / "train.csv"
    plain.write_bytes(raw)
    (tmp_path / "train.csv.gz").write_bytes(gzip.compress(raw))
    with zipfile.ZipFile(tmp_path / "train.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fresh_comp_offline/tianchi_fresh_comp_train_user.csv", raw)
        archive.writestr("__MACOSX/._tianchi_fresh_comp_train_user.csv", b"junk")
    outputs = []
    for i, src in enumerate([plain, tmp_path / "train.csv.gz", tmp_path / "train.zip"]):
        convert("alibaba", src, tmp_path / f"o{i}", behaviors="all", **SMALL)
        outputs.append((tmp_path / f"o{i}/alibaba/alibaba.inter").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0].decode() == reference("alibaba", lines, set(ALIBABA_NAMES.values()), (None, None), True, 0)["text"]


def test_truncated_or_corrupt_archives_are_one_line_errors(tmp_path, capsys):
    raw = gzip.compress(b"\n".join(tianchi_lines(n=3000, bad=False)) + b"\n")
    (tmp_path / "cut.csv.gz").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "bad.csv.gz").write_bytes(bytes(corrupt))
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04" + bytes(100))
    for src in ("cut.csv.gz", "bad.csv.gz", "bad.zip"):
        code, _, err = run_cli(["tianchi", "--input", str(tmp_path / src), "--output", str(tmp_path / "o")], capsys)
        assert_one_error_line(code, err, "cannot read")
        assert not (tmp_path / "o" / "tianchi").exists()


def test_binary_input_without_newlines_is_refused_quickly(tmp_path, capsys):
    (tmp_path / "blob.csv").write_bytes(bytes(range(1, 10)) * 300_000)
    code, _, err = run_cli(["tianchi", "--input", str(tmp_path / "blob.csv"), "--output", str(tmp_path / "o")], capsys)
    assert_one_error_line(code, err, "not a csv log")


def test_zip_with_two_csv_members_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.csv", "1,2,3,pv,1511539300\n")
        archive.writestr("b.csv", "1,2,3,pv,1511539300\n")
    with pytest.raises(PopPriorError, match="exactly one .csv"):
        convert("tianchi", tmp_path / "two.zip", tmp_path / "out", progress=False)


def test_alibaba_time_is_read_as_utc8_whatever_the_machine_timezone(tmp_path):
    lines = alibaba_lines(seed=2, bad=False)
    src = write_log(tmp_path / "a.csv", lines)
    outputs = []
    for tz in ("UTC", "America/Los_Angeles"):
        out = tmp_path / tz.replace("/", "_")
        env = dict(os.environ, TZ=tz, PYTHONPATH=str(ROOT))
        code = ("import time, sys; time.tzset(); from recbole_popprior.converters.pipeline import convert; "
                "convert('alibaba', sys.argv[1], sys.argv[2], behaviors='all', progress=False)")
        subprocess.run([sys.executable, "-c", code, str(src), str(out)], env=env, check=True, cwd=ROOT)
        outputs.append((out / "alibaba/alibaba.inter").read_bytes())
    assert outputs[0] == outputs[1]
    first = outputs[0].decode().splitlines()[1].split("\t")
    expected = datetime.strptime(lines[1].decode().split(",")[5], "%Y-%m-%d %H").replace(
        tzinfo=timezone(timedelta(hours=8)))
    assert first[:2] == ["5", first[1]] and int(first[2]) >= 0
    assert str(int(expected.timestamp())) in outputs[0].decode()


# ----------------------------------------------------------------------------- bad input


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args + ["--no-progress"])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, pattern: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), err


def test_empty_file_is_an_error_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "empty.csv"
    src.write_bytes(b"")
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "empty")
    assert not (tmp_path / "out" / "tianchi").exists()


def test_header_only_and_blank_files_are_errors(tmp_path, capsys):
    src = write_log(tmp_path / "h.csv", alibaba_lines(n=0, bad=False))
    code, _, err = run_cli(["alibaba", "--input", str(src), "--output", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "no data rows")
    src = write_log(tmp_path / "b.csv", [b"", b"  "])
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "no data rows")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.inter"))


def test_missing_input_and_wrong_header(tmp_path, capsys):
    code, _, err = run_cli(["tianchi", "--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path)], capsys)
    assert_one_error_line(code, err, "not found")
    src = write_log(tmp_path / "a.csv", tianchi_lines(bad=False)[:5])
    code, _, err = run_cli(["alibaba", "--input", str(src), "--output", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "unexpected header")


def test_unwritable_output_directory(tmp_path, capsys):
    src = write_log(tmp_path / "u.csv", tianchi_lines(bad=False))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(blocker / "sub")], capsys)
    assert_one_error_line(code, err, "cannot write output")


@pytest.mark.parametrize("line, problem", [
    (b"1,2,3,pv", "column_count"),
    (b"1,2,3,pv,1511539300,4", "column_count"),
    (b"a1,2,3,pv,1511539300", "bad_id"),
    (b"1,2,3,pv,2017-11-25", "bad_time"),
    (b"1,2,3,clicked,1511539300", "unknown_behavior"),
    (b"1,2,3,p\xe9v,1511539300", "encoding"),
])
def test_each_bad_row_is_skipped_and_counted(tmp_path, line, problem):
    good = tianchi_lines(seed=5, n=60, bad=False)
    lines = good[:30] + [line] + good[30:]
    src = write_log(tmp_path / "u.csv", lines)
    summary = convert("tianchi", src, tmp_path / "out", behaviors="all", progress=False)
    assert summary["bad_rows"] == {k: int(k == problem) for k in BAD_KINDS}
    assert summary["bad_examples"][0]["line"] == 31 and summary["bad_examples"][0]["problem"] == problem
    ref = reference("tianchi", lines, set(TIANCHI_NAMES), (T0, T1), True, 0)
    assert (tmp_path / "out/tianchi/tianchi.inter").read_text() == ref["text"]


@pytest.mark.parametrize("kind", ["tianchi", "alibaba"])
def test_ids_pyarrow_would_accept_leniently_are_bad_rows_in_any_block(tmp_path, kind):
    """' 7', '0x7' and '-0' are not ids, whichever parser (fast or slow) sees the block."""
    if kind == "tianchi":
        good, bad = tianchi_lines(seed=10, n=80, bad=False), [b" 7,2,3,pv,1511539300", b"0x7,2,3,pv,1511539300",
                                                             b"7,-0,3,pv,1511539300", b"7,2,3 ,pv,1511539300"]
    else:
        good, bad = alibaba_lines(seed=10, n=80, bad=False), [b" 7,2,1,,3,2014-12-01 10", b"0x7,2,1,,3,2014-12-01 10",
                                                             b"7,-0,1,,3,2014-12-01 10", b"7,2,1,,3 ,2014-12-01 10"]
    lines = good[:40] + bad + good[40:]
    src = write_log(tmp_path / "log.csv", lines)
    for block_bytes in (64, 1 << 20):
        out = tmp_path / f"o{block_bytes}"
        summary = convert(kind, src, out, behaviors="all", block_bytes=block_bytes, progress=False)
        assert summary["bad_rows"]["bad_id"] == 4
        names = set(TIANCHI_NAMES) if kind == "tianchi" else set(ALIBABA_NAMES.values())
        window = (T0, T1) if kind == "tianchi" else (None, None)
        assert (out / kind / f"{kind}.inter").read_text() == reference(kind, lines, names, window, True, 0)["text"]


def test_alibaba_unknown_code_and_bad_time_are_counted(tmp_path):
    lines = alibaba_lines(seed=4, n=50)
    src = write_log(tmp_path / "a.csv", lines)
    summary = convert("alibaba", src, tmp_path / "out", progress=False)
    assert summary["bad_rows"] == {"column_count": 2, "encoding": 1, "bad_id": 1, "bad_time": 3,
                                   "unknown_behavior": 2}


def test_truncated_last_line_is_a_bad_row(tmp_path):
    lines = tianchi_lines(seed=6, n=50, bad=False) + [b"17,4,5,p"]
    src = write_log(tmp_path / "u.csv", lines, trailing_newline=False)
    summary = convert("tianchi", src, tmp_path / "out", progress=False)
    assert summary["bad_rows"]["column_count"] == 1
    assert summary["bad_examples"][0]["line"] == len(lines)
    assert (tmp_path / "out/tianchi/tianchi.inter").read_text() == \
        reference("tianchi", lines, {"pv"}, (T0, T1), True, 0)["text"]


def test_too_many_bad_rows_stops_with_one_line_and_no_output(tmp_path, capsys):
    lines = tianchi_lines(seed=8, n=200, bad=True)  # 8 bad rows
    src = write_log(tmp_path / "u.csv", lines)
    out = tmp_path / "out"
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(out), "--max-bad-rows", "7"], capsys)
    assert_one_error_line(code, err, r"too many bad rows \(8 > --max-bad-rows 7\)")
    assert not (out / "tianchi").exists()
    code, stdout, _ = run_cli(["tianchi", "--input", str(src), "--output", str(out), "--max-bad-rows", "8"], capsys)
    assert code == 0 and "bad rows 8" in stdout


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    src = write_log(tmp_path / "u.csv", tianchi_lines(bad=False))
    for extra, pattern in [(["--behaviors", "pv,view"], "unknown tianchi behaviour"),
                           (["--start", "yesterday"], "cannot read time"),
                           (["--start", "2017-12-02", "--end", "2017-12-01"], "empty time window"),
                           (["--k-core", "-1"], "k-core"), (["--name", "../x"], "bad dataset name")]:
        code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(tmp_path / "o")] + extra, capsys)
        assert_one_error_line(code, err, pattern)
    code, _, err = run_cli(["nope", "--input", str(src), "--output", str(tmp_path / "o")], capsys)
    assert_one_error_line(code, err, "invalid choice")
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(tmp_path / "o"),
                            "--start", "2017-12-05", "--end", "2017-12-06"], capsys)
    assert_one_error_line(code, err, "no rows left")
    assert not list((tmp_path / "o").rglob("*.inter")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupted_run_leaves_no_output_and_no_temp_files(tmp_path, monkeypatch, how, capsys):
    src = write_log(tmp_path / "u.csv", tianchi_lines(seed=9, n=300, bad=False))
    out = tmp_path / "out"
    (out / "tianchi").mkdir(parents=True)
    real_write = converters_buckets.write_tsv
    calls = []

    def write_then_stop(handle, arrays, names):
        real_write(handle, arrays, names)
        calls.append(1)
        if len(calls) == 1:  # mid-output: rows are already in the temporary file
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt

    monkeypatch.setattr(converters_buckets, "write_tsv", write_then_stop)
    code, _, err = run_cli(["tianchi", "--input", str(src), "--output", str(out), "--behaviors", "all"], capsys)
    assert code == 130 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert (("signal 15" in err) if how == "sigterm" else ("interrupted" in err))
    assert list((out / "tianchi").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _sigkill_at_rename(tmp_path: Path, src: Path, out: Path, stop_at: int = 1) -> None:
    """Run the converter's real command line and SIGKILL it at its ``stop_at``-th ``os.replace`` (1:
    the temporary .inter renamed into place), patched at start-up by a sitecustomize module."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nreal, calls = os.replace, []\n"
        "def replace(a, b, **kw):\n    calls.append(b)\n"
        f"    if len(calls) == {stop_at}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(a, b, **kw)\n"
        "os.replace = replace\n")
    proc = subprocess.run([sys.executable, "-m", "recbole_popprior.convert", "tianchi", "--input", str(src),
                           "--output", str(out), "--no-progress"], cwd=ROOT, capture_output=True,
                          env=dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}"), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_the_next_conversion_removes_what_a_killed_one_left(tmp_path):
    """SIGKILL leaves the work folder (the sorted buckets) and the temporary .inter: no clean-up code
    runs. The next conversion of the same name removes them (issue 19, 12)."""
    out = tmp_path / "out"
    convert("tianchi", write_log(tmp_path / "old.csv", tianchi_lines(seed=23, n=100, bad=False)), out, progress=False)
    lines = tianchi_lines(seed=24, bad=False)
    src = write_log(tmp_path / "new.csv", lines)
    _sigkill_at_rename(tmp_path, src, out)
    left = sorted(p.name for p in (out / "tianchi").iterdir() if p.name.startswith("."))
    assert any(n.startswith(".tianchi.convert-") and not n.endswith(".lock") for n in left), left
    assert any(n.startswith(".tianchi.inter.") and n.endswith(".tmp") for n in left), left
    convert("tianchi", src, out, progress=False)
    assert not [p.name for p in (out / "tianchi").iterdir() if p.name.startswith(".")]
    assert describes(out / "tianchi/tianchi.summary.json")
    assert (out / "tianchi/tianchi.inter").read_text() == reference("tianchi", lines, {"pv"}, (T0, T1), True, 0)["text"]


def test_a_second_conversion_into_the_same_folder_is_refused_while_one_runs(tmp_path):
    import fcntl

    out = tmp_path / "out"
    src = write_log(tmp_path / "a.csv", tianchi_lines(seed=25, n=100, bad=False))
    convert("tianchi", src, out, progress=False)
    before = {p.name: p.read_bytes() for p in (out / "tianchi").iterdir()}
    lock = out / "tianchi" / ".tianchi.convert.lock"
    with open(lock, "w") as held:  # what a running conversion holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PopPriorError, match="another conversion is writing tianchi.inter"):
            convert("tianchi", src, out, progress=False)
    lock.unlink()
    assert {p.name: p.read_bytes() for p in (out / "tianchi").iterdir()} == before
