"""The arms of a comparison: named sets of config overrides on top of the user's config and seed.

``--compare --arms=standard,separated,resn`` trains one model per arm and seed and compares
every arm with ``standard`` on the same test contexts (:mod:`recbole_popprior.compare`,
docs/DESIGN.md §3.2). :data:`ARMS` is the one table of arms. An arm may only name config keys
that the plugin ships a default for (``properties/overall.yaml``): a remedy arm whose keys are
not implemented fails with one line before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from recbole_popprior.errors import PopPriorError


@dataclass(frozen=True)
class ArmSpec:
    """One arm: ``overrides`` go on top of the user's config; ``baseline`` selects RecBole's own class.

    ``label`` is formatted with ``model``, ``tau`` (the arm's trained prior weight) and ``beta``
    (its serving weight). ``requires`` names keys the user must set (e.g. ``ace_init``): they
    reach this arm only, every other arm gets the shipped default.
    """

    name: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False
    requires: tuple[str, ...] = ()


#: every arm ``--arms`` accepts (``standard`` is the reference of every matched reduction)
ARMS: dict[str, ArmSpec] = {spec.name: spec for spec in (
    ArmSpec("standard", "RecBole {model} (tau=0)", {"prior_tau": 0.0}, baseline=True),
    ArmSpec("separated", "prior-separated {model} (tau={tau:g}, beta={beta:g})"),
    ArmSpec("directspec", "{model} + DirectSpec (tau=0)",
            {"prior_tau": 0.0, "remedy": "directspec", "directspec_plus": False}),
    ArmSpec("directspec_plus", "{model} + DirectSpec+ (tau=0)",
            {"prior_tau": 0.0, "remedy": "directspec", "directspec_plus": True}),
    ArmSpec("adap_tau", "{model} + Adap-tau (tau=0)", {"prior_tau": 0.0, "remedy": "adap_tau"}),
    ArmSpec("resn", "{model} + ReSN (tau=0)", {"prior_tau": 0.0, "remedy": "resn"}),
    ArmSpec("ace", "{model} + ACE init (tau=0)", {"prior_tau": 0.0}, requires=("ace_init",)),
)}

#: ``--arms`` when not given: today's two-arm comparison
DEFAULT_ARMS: tuple[str, ...] = ("standard", "separated")
REFERENCE = "standard"
_USER_KEYS = frozenset({"prior_tau"})  # the user's value is the separated arm's


def parse_arms(arms: str | Iterable[str] | None, table: Mapping[str, ArmSpec] = ARMS) -> tuple[str, ...]:
    """Arm names from ``--arms=a,b,c`` (or a sequence), checked against ``table``; None = the default."""
    if arms is None:
        return DEFAULT_ARMS
    names = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms)]
    names = [a for a in names if a]
    unknown = [a for a in names if a not in table]
    if unknown:
        raise PopPriorError(f"unknown arm {unknown[0]!r} in --arms; known arms: {', '.join(table)}")
    if len(set(names)) != len(names):
        raise PopPriorError(f"--arms names an arm twice: {','.join(names)}")
    if REFERENCE not in names:
        raise PopPriorError(f"--arms must include {REFERENCE} (every other arm is compared with it)")
    if len(names) < 2:
        raise PopPriorError(f"--arms needs at least one arm besides {REFERENCE}")
    return tuple([REFERENCE] + [a for a in names if a != REFERENCE])


def _arm_keys(table: Mapping[str, ArmSpec]) -> set[str]:
    """Keys that arms choose (every arm's overrides and required keys, but the user's prior_tau)."""
    keys = {k for spec in table.values() for k in (*spec.overrides, *spec.requires)}
    return keys - _USER_KEYS


def check_arms(names: Iterable[str], table: Mapping[str, ArmSpec], defaults: Mapping[str, Any],
               config: Mapping[str, Any]) -> None:
    """One-line errors, before any training, for arms this configuration cannot run.

    ``defaults``: the shipped ``properties/overall.yaml``; ``config``: the user's resolved config.
    """
    for name in names:
        spec = table[name]
        missing = [k for k in (*spec.overrides, *spec.requires) if k not in defaults]
        if missing:
            raise PopPriorError(f"arm {name!r} needs config key(s) {', '.join(missing)}, which this version of "
                                "the plugin does not know (no default in properties/overall.yaml)")
        for key in spec.requires:
            if config.get(key) is None:
                raise PopPriorError(f"arm {name!r} needs --{key}=... (it has no value)")
    required = {k for spec in table.values() for k in spec.requires}
    for key in sorted(_arm_keys(table) - required):
        if key in defaults and key in config and config[key] != defaults[key]:
            raise PopPriorError(f"{key} is chosen per arm in a comparison (--arms); remove {key}={config[key]!r}")


def resolve_arm(spec: ArmSpec, config: Mapping[str, Any]) -> ArmSpec:
    """``spec`` under this configuration: a ``baseline`` arm (RecBole's own class) stays one only
    while the configured training objective is RecBole's own loss. With the plugin's objective
    (``softmax_negatives > 0``, DESIGN §6.1) it is the plugin's class at ``prior_tau: 0``, which
    trains that objective with no prior. So is it with ``auto``, which every arm resolves alike
    once the item count is known: to sampled softmax, or to the full softmax, where the plugin's
    class at ``prior_tau: 0`` is RecBole's model exactly."""
    negatives = config.get("softmax_negatives") or 0  # K, or auto (decided per model: model/negatives.py)
    if spec.baseline and (negatives == "auto" or int(negatives) > 0):
        return replace(spec, label=spec.label.replace("RecBole {model}", "{model}") + " (plugin's objective)",
                       baseline=False)
    return spec


def arm_overrides(spec: ArmSpec, table: Mapping[str, ArmSpec], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The config overrides of one arm: its own, plus the shipped default of every key another arm
    chooses, so that e.g. ``--ace_init`` reaches the ace arm only."""
    own = set(spec.overrides) | set(spec.requires)
    out = {k: defaults[k] for k in sorted(_arm_keys(table) - own) if k in defaults}
    out.update(spec.overrides)
    out["popprior_baseline"] = bool(spec.baseline)
    return out


__all__ = ["ArmSpec", "ARMS", "DEFAULT_ARMS", "REFERENCE", "parse_arms", "check_arms", "arm_overrides", "resolve_arm"]
