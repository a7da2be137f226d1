"""Configuration files: ``fastpurify purify DEFENSE --config run.yaml`` and the studies of ``fastpurify sweep``.

A configuration file is YAML (``.yaml`` / ``.yml``; needs PyYAML: ``pip install fastpurify[yaml]``) or JSON
(``.json``; needs nothing), holding one mapping. Its keys are the ones the Python API takes — ``epochs``, ``lr``,
``batch_size``, ``time_budget``, ``seed``, and whatever else the defense's hyper-parameter dataclass has
(``fastpurify.defenses.<name>.Fast<NAME>Config`` or ``fastpurify.reference.defenses.<name>.<NAME>Config``) —
plus the command's own inputs, spelled like its options with ``_`` for ``-``::

    # examples/purify.yaml: fastpurify purify sau --config examples/purify.yaml
    checkpoint: ../shared/data/ibau/badnets_8_02_ckpt.pth   # the command's inputs ...
    arch: small_vgg
    trigger: "patch:size=4,row=27,col=27,value=1"
    target: 8
    clean_count: 2500
    eval_count: 1000
    seed: 0
    epochs: 2            # ... and the defense's settings
    lr: 1.0e-4
    batch_size: 128

Rules:

- **Precedence**: an option given on the command line wins over the file (``--seed 3`` beats ``seed: 0``);
  ``--set KEY=VALUE`` wins over the file's ``KEY``; the file wins over the command's defaults.
- **Command inputs** are the destinations of ``fastpurify purify``'s options (``checkpoint``, ``arch``, ``data``,
  ``trigger``, ``target``, ``clean_count``, ``eval_count``, ``out``, ``seed``, ``device``, ``epochs``,
  ``time_budget``, ``reference``, ``checkpoint_every``, ``state``, ``resume``, ``model``, ``model_kwargs``, and
  any added later); each takes the type its option takes (an integer for ``target``, a number for
  ``time_budget``, true/false for ``reference``, a mapping for ``model_kwargs``). ``defense:`` may be given too,
  and must then name the command's defense; ``record:`` may not (give ``--record PATH`` on the command line).
- **Every other key is a defense setting**, checked as ``--set`` is (the same names, the same validation) before
  anything is loaded; ``progress``, ``inplace`` and ``eval_data`` belong to the command and are refused.
- Relative paths are taken from the current directory, as on the command line.
- Errors name the file and the key (``run.yaml: target: expected an integer, got 'eight'``) and come before any
  work; ``fastpurify`` prints them as one line and exits with status 2.
- YAML note: ``lr: 1e-4`` is read as the number 0.0001 here (plain YAML 1.1 would read a string).

Studies (``fastpurify sweep study.yaml``) use the same keys for their defense settings; their own format is
described in :mod:`fastpurify.sweep`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Set

# The command's own keys that a purify config file may not set: the defense (given on the command line), the
# file itself, the repeatable --set and the output format.
_NOT_FILE_KEYS = ("defense", "config", "set", "json", "func", "command", "help", "argv")
# Options of ``fastpurify purify`` that only the command line may give, and why.
_CLI_ONLY = {"record": "give --record PATH on the command line (a record takes another path through purify)"}
# Options of ``fastpurify purify`` that are required (without --record) unless a config file gives them.
REQUIRED = ("checkpoint", "trigger", "target")
# A float in YAML 1.2 spelling that PyYAML (YAML 1.1) reads as a string: 1e-4, 5E3, -2e+1 (no dot).
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml():
    try:
        import yaml
    except ImportError:
        from .models.checkpoint import MissingExtraError  # a ValueError too: the command line prints one line

        raise MissingExtraError("reading YAML configuration files needs PyYAML: pip install fastpurify[yaml] (or give "
                                "a .json file)") from None
    return yaml


def load_file(path, what: str = "config") -> Dict[str, Any]:
    """Read a YAML or JSON file holding one mapping with string keys (an empty file is an empty mapping).

    Example:
        >>> load_file("examples/purify.yaml")["target"]  # doctest: +SKIP
        8
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
    else:
        yaml = _yaml()

        class Loader(yaml.SafeLoader):  # a private subclass: the resolver below changes no one else's loader
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))
        try:
            data = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{p}: keys must be names, got {bad}")
    return data


def check_type(value: Any, kind: Any, where: str) -> Any:
    """``value`` as the ``kind`` an option takes (``int``, ``float``, ``str`` or ``bool``); ``where`` names the
    file and key in the error."""
    if value is None or kind is None:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif kind is str:
        if isinstance(value, (dict, list, bool)):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        value = str(value)
    return value


# --------------------------------------------------------------------------------------------------------
# fastpurify purify --config FILE
# --------------------------------------------------------------------------------------------------------


def _purify_parser() -> argparse.ArgumentParser:
    from .cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["purify"]


def _option_kind(action: argparse.Action) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    return action.type if action.type in (int, float) else str


def _explicit(parser: argparse.ArgumentParser, argv) -> Set[str]:
    """The destinations the command line gave: ``argv`` parsed again with every default replaced by a marker."""
    unset = object()
    rest = list(argv)
    rest = rest[rest.index("purify") + 1:] if "purify" in rest else rest
    dests = [a for a in parser._actions if a.dest != argparse.SUPPRESS]
    plain = (argparse._StoreAction, argparse._StoreConstAction)  # store_true/false are store_const
    ns = argparse.Namespace(**{a.dest: unset if isinstance(a, plain) else None for a in dests})  # append: None
    parser.parse_known_args(rest, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not unset and v is not None}


def apply_purify_config(args, argv) -> Dict[str, str]:
    """Fill ``args`` (the parsed ``purify`` options) from ``args.config``: every option not given on the command
    line (``argv``) takes the file's value; the file's other keys become defense settings
    (``args.config_settings``, below ``--set``), validated here with the file's name. Returns ``{option dest:
    file}`` for the options the file gave. Everything is checked before anything is loaded."""
    from .cli import parse_sets
    from .cli_purify import CLI_OWNED, defense_config
    from .defenses import DEFENSES
    from .defenses._run import COMMON_OPTIONS

    path = str(args.config)
    data = load_file(path)
    parser = _purify_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FILE_KEYS and a.dest != argparse.SUPPRESS}
    given = _explicit(parser, argv)
    if "defense" in data and str(data["defense"]).lower() != str(args.defense).lower():
        raise ValueError(f"{path}: defense: {data['defense']!r} but the command runs {args.defense!r}; drop the key "
                         "or run that defense")
    origin: Dict[str, str] = {}
    settings: Dict[str, Any] = {}
    for key, value in data.items():
        if key == "defense":
            continue
        if key in _CLI_ONLY:
            raise ValueError(f"{path}: {key}: {_CLI_ONLY[key]}")
        if key in actions:
            if key == "model_kwargs" and isinstance(value, dict):  # a mapping here; --model-kwargs takes JSON text
                value = json.dumps(value)
            value = check_type(value, _option_kind(actions[key]), f"{path}: {key}")
            if key not in given:
                setattr(args, key, value)
                origin[key] = path
        elif key in _NOT_FILE_KEYS:
            raise ValueError(f"{path}: {key}: not a configuration key (give it on the command line)")
        elif key in CLI_OWNED:
            raise ValueError(f"{path}: {key}: {CLI_OWNED[key]}")
        else:
            settings[key] = value
    name = str(args.defense).lower()
    if name in DEFENSES:  # an unknown defense is reported by the command's own check
        overridden = parse_sets(args.set)
        hyper = {k: v for k, v in settings.items() if k not in overridden and k not in COMMON_OPTIONS}
        defense_config(name, bool(args.reference), None, hyper, path)
    args.config_settings = settings
    return origin


@contextlib.contextmanager
def purify_config(args, argv=None) -> Iterator[None]:
    """Apply ``--config`` (if given) to ``args``, check that the required inputs are there, and, while the block
    runs the command's other checks, add the file's name to an error about an option that the file gave."""
    origin: Dict[str, str] = {}
    if getattr(args, "config", None):
        origin = apply_purify_config(args, argv if argv is not None else getattr(args, "argv", None) or [])
    missing = [] if getattr(args, "record", None) is not None else [
        k for k in REQUIRED if hasattr(args, k) and getattr(args, k) is None]
    if missing:
        raise ValueError("the following arguments are required: " + ", ".join(f"--{k}" for k in missing)
                         + " (on the command line, or as keys of a --config file)")
    try:
        yield
    except (ValueError, TypeError) as e:
        flags = [k for k in origin if f"--{k.replace('_', '-')}" in str(e)]
        if not flags:
            raise
        raise type(e)(f"{e} ({', '.join(flags)}: from {origin[flags[0]]})") from None

