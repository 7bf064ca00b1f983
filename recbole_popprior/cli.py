"""The command line of ``recbole-popprior`` (and ``run_recbole_popprior.py``): one argparse parser
per command, built from two tables, :data:`OPTIONS` and :data:`COMMANDS`.

This module imports only the standard library and the package's light modules, so that the
arguments are checked and ``--help`` is printed before torch or RecBole load (in well under a
second). The heavy half, :mod:`recbole_popprior.commands`, is loaded after parsing, through the
package's one lazy import point (``recbole_popprior.__getattr__``).

A command is chosen by its flag (``--compare``, ``--beta-sweep=LIST``, ``--tune``; none: train
and test one model). Every ``--key=value`` that is not an option of the command becomes a
RecBole (or plugin) config override, as in RecBole's ``run_recbole.py``; a misspelled plugin
setting is warned about when the config is built. Bad input ends with one ``error:`` line and
exit status 2; Ctrl-C with one line and status 130.

To add a command: one :class:`Command` entry in :data:`COMMANDS` (its options in
:data:`OPTIONS`, in a group of their own) and one function of the same ``run`` name in
:mod:`recbole_popprior.commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import recbole_popprior
from recbole_popprior import interrupts
from recbole_popprior.arms import ARMS, parse_arms
from recbole_popprior.errors import PopPriorError

PROG = "recbole-popprior"


# --------------------------------------------------------------------------------------
# Value checks: (flag, text) -> value, or one PopPriorError line
# --------------------------------------------------------------------------------------
def _integer(low: int, *, minus_one: bool = False) -> Callable[[str, str], int]:
    def check(flag: str, text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise PopPriorError(f"{flag} must be an integer, got {text!r}") from None
        if minus_one and value == -1:
            return value
        if value < low:
            extra = f" (or -1: --nproc)" if minus_one else ""
            raise PopPriorError(f"{flag} must be >= {low}{extra}, got {value}")
        return value
    return check


def _seconds(flag: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PopPriorError(f"{flag} must be seconds, got {text!r}") from None
    if not 0 < value < math.inf:
        raise PopPriorError(f"{flag} must be a positive number of seconds, got {text!r}")
    return value


def _numbers(flag: str, text: str) -> list[float]:
    try:
        values = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise PopPriorError(f"{flag} takes numbers separated by commas, got {text!r}") from None
    if not values:
        raise PopPriorError(f"{flag} needs at least one beta value, e.g. {flag}=0,0.5,1")
    if not all(math.isfinite(v) for v in values):
        raise PopPriorError(f"{flag} takes finite numbers, got {text!r}")
    return values


def _files(flag: str, text: str) -> list[str]:
    paths = text.split()
    for path in paths:
        if os.path.isdir(path):
            raise PopPriorError(f"config file {path} is a directory, not a file")
        if not os.path.isfile(path):
            raise PopPriorError(f"config file not found: {path}")
    return paths


def _choice(*choices: str) -> Callable[[str, str], str]:
    def check(flag: str, text: str) -> str:
        if text.lower() not in choices:
            raise PopPriorError(f"{flag} must be one of {', '.join(choices)}, got {text!r}")
        return text.lower()
    return check


def _text(flag: str, text: str) -> str:
    if not text.strip():
        raise PopPriorError(f"{flag} is empty")
    return text


def _flag(flag: str, value: Any) -> bool:
    """A switch: ``--x``, or ``--x=true|false|1|0``."""
    if value is True:
        return True
    if str(value).lower() in ("true", "1", "false", "0"):
        return str(value).lower() in ("true", "1")
    raise PopPriorError(f"{flag} is a flag; it takes no value (or true/false)")


# --------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One command-line option: its canonical spelling, default, one line of help, and check.

    ``dest`` is the key in the parsed options (the flag without dashes, ``-`` as ``_``);
    ``override``: the value also becomes the config setting of that name (``--output``).
    Both spellings (``--n-trials`` and ``--n_trials``) are accepted.
    """

    flag: str
    help: str
    default: Any = None
    check: Callable[[str, Any], Any] | None = None  # None: the text as given
    switch: bool = False
    metavar: str | None = None
    override: bool = False
    shown_default: str | None = None  # how the help states the default, when not repr(default)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


#: every option of every command, by group (a command lists the groups it takes)
OPTIONS: dict[str, tuple[Option, ...]] = {
    "data": (
        Option("--model", "a RecBole model name (SASRec, GRU4Rec, ...); --tune also takes a comma list or 'all'",
               metavar="NAME", shown_default="required; with --checkpoint, the checkpoint's"),
        Option("--dataset", "a dataset name: ml-100k (shipped in RecBole), synthetic, tianchi, alibaba, or yours",
               metavar="NAME", shown_default="required; with --checkpoint, the checkpoint's"),
        Option("--config_files", "yaml files of settings, space separated, later files win", check=_files,
               metavar="'A.yaml B.yaml'", shown_default="none"),
        Option("--data_path", "folder that holds <dataset>/<dataset>.inter (config key data_path)",
               override=True, metavar="DIR", shown_default="RecBole's dataset/; ml-100k is found inside RecBole"),
        Option("--output", "folder for run folders and reports (config key output)", override=True,
               metavar="DIR", shown_default="saved"),
    ),
    "checkpoint": (
        Option("--checkpoint", "evaluate this trained model (a model.pth of the plugin) instead of training one",
               metavar="PATH", shown_default="none: train"),
        Option("--trust-pickled-checkpoint", "also load a RecBole-trained checkpoint, a pickle: read by a restricted "
               "unpickler, but with no digest, so only for files you trust", default=False, check=_flag, switch=True),
    ),
    "compare": (
        Option("--compare", "train RecBole's model and the prior-separated model (and other arms) per seed, "
               "matched, and report them side by side", default=False, check=_flag, switch=True),
        Option("--seeds", "training seeds per arm (seed, seed+1, ...)", default=3, check=_integer(1), metavar="N"),
        Option("--arms", f"arms to compare, comma separated, standard first; known: {', '.join(ARMS)}",
               check=lambda flag, text: parse_arms(text), metavar="A,B,...", shown_default="standard,separated"),
    ),
    "beta_sweep": (
        Option("--beta-sweep", "serve one trained prior-separated model at these serving weights beta "
               "(no retraining); with --checkpoint, an existing one", check=_numbers, metavar="B1,B2,...",
               shown_default="required, e.g. -1,0,0.5,1"),
    ),
    "tune": (
        Option("--tune", "Optuna search over the prior weights (tau, alpha), beta swept free per trial",
               default=False, check=_flag, switch=True),
        Option("--n-trials", "trials this command adds to each model's study (0: only rewrite the report)",
               default=20, check=_integer(0), metavar="N"),
        Option("--storage", "Optuna storage: sqlite:///x.db, journal:x.journal or postgresql://...", metavar="URL",
               shown_default="sqlite (journal with --n-workers > 1) under <output>/tuning/"),
        Option("--study-name", "study name (letters, digits, '.', '_', '-')", metavar="NAME",
               shown_default="popprior-<dataset>"),
        Option("--timeout", "budget of the whole command in seconds: no trial starts after it", check=_seconds,
               metavar="SECONDS", shown_default="none"),
        Option("--search-space", "yaml file that adds, replaces (or with ~ removes) search-space entries",
               metavar="FILE", shown_default="the config key tune_search_space"),
        Option("--n-workers", "tuning processes on this machine", default=1, check=_integer(1), metavar="K"),
        Option("--multi-objective", "also minimise shared_frac (PopEnergy) and report the Pareto front",
               default=False, check=_flag, switch=True),
        Option("--pruner", "pruner of the per-epoch validation scores", default="median",
               check=_choice("median", "hyperband", "none"), metavar="median|hyperband|none"),
    ),
    "distributed": (
        Option("--nproc", "training processes on this machine (DDP)", default=1, check=_integer(1), metavar="K"),
        Option("--world_size", "processes on all machines; -1: --nproc", default=-1,
               check=_integer(1, minus_one=True), metavar="N"),
        Option("--ip", "address of the machine that runs rank 0", default="127.0.0.1", check=_text),
        Option("--port", "rendezvous port on that machine", default="5678", check=_text),
        Option("--group_offset", "global rank of this machine's first process", default=0, check=_integer(0),
               metavar="R"),
    ),
    "output": (
        Option("--verbose", "also print RecBole's config, dataset and model dumps on the screen "
               "(they always go to the run's run.log)", default=False, check=_flag, switch=True),
        Option("--traceback", "on an unexpected error, print the whole traceback instead of one line",
               default=False, check=_flag, switch=True),
    ),
}

#: the help's heading of each option group
GROUP_TITLES = {"data": "model and data", "checkpoint": "a trained model", "compare": "--compare",
                "beta_sweep": "--beta-sweep", "tune": "--tune", "distributed": "distributed training (DDP)",
                "output": "output"}


@dataclass(frozen=True)
class Command:
    """One command: the flag that selects it (None: the default), its option groups, and the
    function of :mod:`recbole_popprior.commands` that runs it."""

    name: str
    flag: str | None
    summary: str
    groups: tuple[str, ...]
    run: str
    example: str
    flag_value: str = ""  # shown after the flag in the usage line (``=B1,B2,...``)


COMMANDS: tuple[Command, ...] = (
    Command("train", None, "train and test one model (prior-separated unless --prior_tau=0), or evaluate a "
            "trained one with --checkpoint; --nproc for DDP", ("data", "checkpoint", "distributed", "output"),
            "train", "--model=SASRec --dataset=ml-100k --prior_tau=1"),
    Command("compare", "--compare", "RecBole's model vs the prior-separated model (and other arms), matched, "
            "over seeds", ("compare", "data", "output"), "compare",
            "--compare --model=SASRec --dataset=ml-100k --seeds=3"),
    Command("beta-sweep", "--beta-sweep", "serve one trained model at several beta without retraining",
            ("beta_sweep", "data", "checkpoint", "output"), "beta_sweep",
            "--beta-sweep=0,0.5,1 --model=SASRec --dataset=ml-100k [--checkpoint=PATH]", "=B1,B2,..."),
    Command("tune", "--tune", "Optuna search over the prior weights", ("tune", "data", "output"), "tune",
            "--tune --model=SASRec,GRU4Rec --dataset=ml-100k --n-trials=20"),
)


def _norm(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def _all_options() -> dict[str, Option]:
    """``{normalised name: Option}`` over every group."""
    return {_norm(o.flag): o for group in OPTIONS.values() for o in group}


def _options_of(command: Command) -> list[Option]:
    return [o for group in command.groups for o in OPTIONS[group]]


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as every plugin command line
        missing = re.fullmatch(r"argument (--[\w-]+)(?:/[^:]*)?: expected one argument", message)
        if missing:
            raise PopPriorError(f"{missing.group(1)} needs a value: {missing.group(1)}=...")
        raise PopPriorError(message)


def program_name() -> str:
    """How this process was started, for the usage line: ``recbole-popprior``,
    ``python run_recbole_popprior.py`` or ``python -m <module>``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and not spec.name.startswith("__main__"):
        return f"python -m {spec.name.removesuffix('.__main__')}"
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else PROG
    return f"python {name}" if name.endswith(".py") else (name or PROG)


def _help_line(option: Option) -> str:
    if option.switch:
        return f"{option.help} (default: off)"
    shown = option.shown_default if option.shown_default is not None else (
        option.default if isinstance(option.default, str) else repr(option.default))
    return f"{option.help} (default: {shown})"


def build_parser(command: Command, prog: str = PROG) -> argparse.ArgumentParser:
    """The argparse parser of ``command``: every option with its default and one line of help."""
    usage_flag = f" {command.flag}{command.flag_value}" if command.flag else ""
    others = "; ".join(f"{prog} {c.flag} --help" for c in COMMANDS if c.flag and c is not command)
    parser = _Parser(
        prog=prog, allow_abbrev=False, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog}{usage_flag} --model=NAME --dataset=NAME [options] [--key=value ...]",
        description=f"{command.summary}.\n\nexample: {prog} {command.example}",
        epilog=("Any other --key=value is a RecBole or plugin config setting, e.g. --epochs=5 --prior_tau=0.5\n"
                "(defaults: RecBole's and the plugin's yaml, properties/overall.yaml; a misspelled plugin\n"
                "setting is warned about).\n"
                "Bad input: one 'error:' line, exit status 2. Ctrl-C: exit status 130.\n"
                + (f"Other commands: {others}." if command.name == "train" else f"Train one model: {prog} --help.")))
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    for group_name in command.groups:
        group = parser.add_argument_group(GROUP_TITLES.get(group_name, group_name))
        for option in OPTIONS[group_name]:
            if option.switch:
                group.add_argument(option.flag, dest=option.dest, nargs="?", const=True, default=None,
                                   metavar="true|false", help=_help_line(option))
            else:
                group.add_argument(option.flag, dest=option.dest, default=None, metavar=option.metavar,
                                   help=_help_line(option))
    return parser


@dataclass
class Invocation:
    """What the command line asked for: the command, its options and the config overrides."""

    command: Command
    options: dict[str, Any]
    overrides: dict[str, Any]


def _canonical(argv: Sequence[str]) -> list[str]:
    """``--n_trials=3`` -> ``--n-trials=3`` (each option's own spelling); other arguments as given."""
    known = _all_options()
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg[2:].partition("=")
            option = known.get(_norm(key))
            if option is not None:
                arg = option.flag + sep + value
        out.append(arg)
    return out


def _command_of(argv: Sequence[str]) -> Command:
    flags = {c.flag: c for c in COMMANDS if c.flag}
    chosen = []
    for arg in argv:
        flag = arg.partition("=")[0]
        if flag in flags and flags[flag] not in chosen:
            chosen.append(flags[flag])
    if len(chosen) > 1:
        raise PopPriorError(f"choose one command: {' and '.join(c.flag for c in chosen)} were given together")
    return chosen[0] if chosen else COMMANDS[0]


def _owner_of(dest: str) -> list[Command]:
    return [c for c in COMMANDS if any(o.dest == dest for o in _options_of(c))]


def parse(argv: Sequence[str], prog: str = PROG) -> Invocation:
    """Check ``argv``; ``--help`` anywhere prints the chosen command's help and exits 0."""
    argv = _canonical(argv)
    command = _command_of(argv)
    parser = build_parser(command, prog)
    if "-h" in argv or "--help" in argv:
        _print(parser.format_help())
        raise SystemExit(0)
    namespace, rest = parser.parse_known_args(argv)
    options: dict[str, Any] = {"command": command.name}
    for option in _all_options().values():  # every option of every command has a value
        options[option.dest] = option.default
    overrides: dict[str, Any] = {}
    for option in _options_of(command):
        given = getattr(namespace, option.dest)
        if given is None:
            continue
        value = option.check(option.flag, given) if option.check else given
        if not option.switch and value is True:
            raise PopPriorError(f"{option.flag} needs a value: {option.flag}=...")
        options[option.dest] = value
        if option.override:
            overrides[option.dest] = value
    for arg in rest:
        if not arg.startswith("--") or len(arg) < 3:
            raise PopPriorError(f"unexpected argument {arg!r}: use --key=value")
        key, sep, value = arg[2:].partition("=")
        owners = _owner_of(_norm(key))
        if owners:
            names = ", ".join(c.flag or "training one model" for c in owners)
            hint = f": add {owners[0].flag}" if len(owners) == 1 and owners[0].flag else ""
            raise PopPriorError(f"--{key} is not an option of {command.flag or 'training one model'}; "
                                f"it belongs to {names}{hint}")
        if not sep:
            raise PopPriorError(f"unknown flag --{key}: config overrides take the form --{key}=value")
        if key in overrides and overrides[key] != value:
            raise PopPriorError(f"--{key} given twice with different values")
        overrides[key] = value
    return Invocation(command, options, overrides)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(options, overrides)`` of ``argv`` (see :func:`parse`)."""
    invocation = parse(argv)
    return invocation.options, invocation.overrides


def _print(text: str) -> None:
    """Print help; a reader that has gone away (``| head -1``) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def dispatch(invocation: Invocation) -> Any:
    """Run the command: the heavy modules load here, after the arguments were checked."""
    options = invocation.options
    if options["checkpoint"] is None:
        if options["model"] is None:
            raise PopPriorError("--model is required, e.g. --model=SASRec")
        if options["dataset"] is None:
            raise PopPriorError("--dataset is required, e.g. --dataset=ml-100k")
    elif options["nproc"] > 1 or options["world_size"] > 1:
        raise PopPriorError("--checkpoint evaluates in one process: remove --nproc/--world_size")
    commands = recbole_popprior.commands  # the lazy import: torch and RecBole load now
    return getattr(commands, invocation.command.run)(options, invocation.overrides)


def guarded(func: Callable[[], Any], show_traceback: bool = False) -> int:
    """Run ``func``; turn bad input into one ``error:`` line (exit 2), other failures into one
    line plus the traceback in the log (exit 1); Ctrl-C exits 130."""
    try:
        func()
        return 0
    except PopPriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # its message, if any, says what was kept (tuning: the report)
        by = " by SIGTERM" if isinstance(exc, interrupts.Terminated) else ""
        print(f"error: interrupted{by}{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 143 if by else 130
    except Exception as exc:  # noqa: BLE001 - the top level of a CLI
        if show_traceback:
            raise
        logging.getLogger().debug("traceback:\n%s", traceback.format_exc())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {message} (rerun with --traceback for details)", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The console command; ``argv`` defaults to ``sys.argv[1:]``."""
    prog = program_name() if argv is None else PROG
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        with interrupts.sigterm_as_interrupt():  # SIGTERM stops a command as Ctrl-C does
            dispatch(parse(argv, prog))

    wants = [a.partition("=") for a in argv if _norm(a.partition("=")[0]) == "traceback"]
    return guarded(run, show_traceback=any(not sep or value.lower() in ("true", "1") for _, sep, value in wants))


__all__ = ["main", "parse", "parse_args", "build_parser", "dispatch", "guarded", "program_name",
           "OPTIONS", "COMMANDS", "Option", "Command", "Invocation"]
