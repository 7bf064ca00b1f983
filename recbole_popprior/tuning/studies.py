"""Which study a command resumes, and whose trial folders are whose (issue 19, 4).

- :func:`create_studies` checks every existing study before it creates a missing one: the
  directions, the objective, the dataset and the search space it was created with must be this
  command's (a study that mixed two datasets or two spaces would report nonsense). Each study
  carries a random ``uid`` (a user attribute).
- :func:`claim_folder` binds ``<output>/tuning/<study-name>/`` to one storage and to each model's
  study ``uid`` (``study.json``): a second storage, or a study deleted and created again under the
  same name, is refused with one line instead of writing its trials into the first one's
  ``trials/<Model>/<n>/`` folders and its summary over the first one's.
- :func:`fail_dead_trials` marks FAIL the RUNNING trials whose worker ran on this machine and is
  gone (killed): without it a journal study keeps them RUNNING for ever (it has no heartbeat).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from recbole_popprior.errors import PopPriorError
from recbole_popprior.tuning.storage import redact, storage_file
from recbole_popprior.utils import write_json

MARKER = "study.json"


def space_record(space: dict[str, Any]) -> str:
    """The search space as canonical JSON (what a study records, and a resume must match)."""
    plain = {name: {k: v for k, v in sorted(vars(param).items()) if k != "name" and v is not None and v is not False
                    and v != ()} for name, param in space.items()}
    return json.dumps(plain, sort_keys=True, default=str)


def create_studies(plan: Any, storage: optuna.storages.BaseStorage) -> dict[str, optuna.Study]:
    """Load each model's study, checked against the plan; create the missing ones only once every
    existing one passed (a refusal writes nothing into the storage)."""
    existing = set(optuna.get_all_study_names(storage))
    space = space_record(plan.space)
    for model in plan.models:
        if plan.study_of(model) in existing:
            _check(optuna.load_study(study_name=plan.study_of(model), storage=storage), plan, model, space)
    studies = {}
    for model in plan.models:
        study = optuna.create_study(storage=storage, study_name=plan.study_of(model),
                                    directions=plan.directions(model), load_if_exists=True)
        _check(study, plan, model, space)  # (another worker may have created it meanwhile)
        attrs = study.user_attrs
        for key, value in (("objective", plan.metrics[model][0]), ("model", model), ("dataset", plan.dataset),
                           ("search_space", space), ("uid", uuid.uuid4().hex)):
            if attrs.get(key) is None:
                study.set_user_attr(key, value)
        studies[model] = optuna.load_study(study_name=study.study_name, storage=storage)
    return studies


def _check(study: optuna.Study, plan: Any, model: str, space: str) -> None:
    found = [d.name.lower() for d in study.directions]
    if found != plan.directions(model):
        raise PopPriorError(f"study {study.study_name} exists with directions {found}, not "
                            f"{plan.directions(model)}: use another --study-name")
    attrs = study.user_attrs
    checks = (("objective", plan.metrics[model][0], "optimises"), ("dataset", plan.dataset, "was run on dataset"),
              ("search_space", space, "was run with the search space"))
    for key, wanted, what in checks:
        known = attrs.get(key)
        if known is not None and known != wanted:
            raise PopPriorError(f"study {study.study_name} {what} {_short(known)}, not {_short(wanted)}: a resumed "
                                "study keeps its dataset and search space; use another --study-name")


def _short(value: Any, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def canonical_storage(url: str) -> str:
    """``url`` with any password hidden and a file's path made absolute (the same file, the same text)."""
    path = storage_file(url)
    if path is None:
        return redact(url)
    kind = "journal" if url.startswith("journal:") or url.endswith(".journal") else url.split(":///", 1)[0]
    return f"{kind}:{os.path.abspath(path)}" if kind == "journal" else f"{kind}:///{os.path.abspath(path)}"


def claim_folder(folder: Path, storage_url: str, uids: dict[str, str]) -> None:
    """Bind ``folder`` to this storage and these studies (``study.json``), or refuse with one line
    when another storage or another study (by ``uid``) owns it. Nothing is written on refusal."""
    marker = folder / MARKER
    storage = canonical_storage(storage_url)
    owner: dict[str, Any] = {}
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PopPriorError(f"cannot read {marker}: {exc}") from None
        if not isinstance(owner, dict):
            raise PopPriorError(f"{marker} is not the tuner's record of the study that owns the folder")
        if owner.get("storage") != storage:
            raise PopPriorError(f"{folder} holds the trials of the same study name in another storage "
                                f"({owner.get('storage')}, not {storage}): use another --study-name or --output")
        for model, uid in uids.items():
            theirs = (owner.get("studies") or {}).get(model)
            if theirs is not None and theirs != uid:
                raise PopPriorError(f"{folder / 'trials' / model} holds the trials of an earlier study "
                                    f"{folder.name}.{model} (deleted and created again in {storage}?): move the "
                                    "folder away, or use another --study-name or --output")
    studies = {**(owner.get("studies") or {}), **uids}
    if owner.get("studies") != studies or owner.get("storage") != storage:
        write_json(marker, {"storage": storage, "studies": studies})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials of ``study`` whose worker (user attribute ``worker``,
    ``host:pid``) ran on this machine and no longer exists; returns their numbers."""
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        where, _, pid = worker.rpartition(":")
        if where != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        storage = study._storage  # Optuna has no public call to end another process's trial
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"its worker {worker} died while it ran")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except RuntimeError:  # finished meanwhile (the pid was another process)
            continue
        failed.append(trial.number)
    return failed
