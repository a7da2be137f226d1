"""Each defense's settings, listed for people: name, default and the one-line description its configuration
class carries in its source (``fastpurify purify DEFENSE --list-options``, ``fastpurify options [DEFENSE]``).

The descriptions are read from the trailing comments of the dataclass fields (the single place they are written),
so the list cannot drift from the code: tests/test_options.py checks that every field of every defense has one.

Example:
    >>> rows = defense_options("sau")
    >>> next(r for r in rows if r["name"] == "epochs")["default"]
    100
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from typing import Any, Dict, List

__all__ = ["ListOptionsAction", "defense_options", "format_options"]


def _config_classes(name: str, reference: bool) -> List[type]:
    from .defenses import DEFENSES, FAST_PATHS

    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; valid: {', '.join(DEFENSES)}")
    ref = importlib.import_module(f"fastpurify.reference.defenses.{name}")
    classes = [getattr(ref, f"{name.upper()}Config")]
    if FAST_PATHS[name] and not reference:
        fast = importlib.import_module(f"fastpurify.defenses.{name}")
        classes.insert(0, getattr(fast, f"Fast{name.upper()}Config"))
    return classes


def _field_comments(cls: type) -> Dict[str, str]:
    """``{field: comment}`` from the class body's source: the comment-only lines right above
    ``name: type = default`` (a long description) followed by the comment at the end of its line."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    out: Dict[str, str] = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        for prev in reversed(lines[:node.lineno - 1]):
            if not prev.strip().startswith("#"):
                break
            above.insert(0, prev.strip()[1:].strip())
        last = lines[node.end_lineno - 1]
        trailing = [last.split("#", 1)[1].strip()] if "#" in last else []
        out[node.target.id] = " ".join(p for p in above + trailing if p)
    return out


def defense_options(name: str, reference: bool = False) -> List[Dict[str, Any]]:
    """The settings of defense ``name`` (the fast path's unless ``reference``): one dict per setting with
    ``name``, ``default``, ``type`` (as written in the source), ``help`` and ``fast_only`` (True for the fast
    path's execution options, which the reference does not take)."""
    classes = _config_classes(name, reference)
    comments: Dict[str, str] = {}
    for cls in reversed(classes):  # the subclass's comment wins where it redefines a field
        for klass in reversed(cls.__mro__):
            if dataclasses.is_dataclass(klass) and klass is not object:
                comments.update(_field_comments(klass))
    ref_fields = {f.name for f in dataclasses.fields(classes[-1])}
    rows = []
    for f in dataclasses.fields(classes[0]):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append({"name": f.name, "default": default, "type": f.type if isinstance(f.type, str) else
                     getattr(f.type, "__name__", str(f.type)), "help": comments.get(f.name, ""),
                     "fast_only": f.name not in ref_fields})
    return rows


def format_options(name: str, reference: bool = False) -> str:
    """The settings of ``name`` as aligned text, with how to give them (``--set KEY=VALUE``, the API's keyword
    arguments) and the options every defense takes."""
    from .defenses._run import COMMON_OPTIONS

    rows = defense_options(name, reference)
    path = "reference" if reference else "fast path"
    width = max(len(r["name"]) for r in rows)
    dwidth = min(24, max(len(repr(r["default"])) for r in rows))
    out = [f"{name} settings ({path}; command line: --set KEY=VALUE, Python: fastpurify.{name}(..., KEY=VALUE)):"]
    for r in rows:
        tag = " [fast path only]" if r["fast_only"] else ""
        out.append(f"  {r['name']:<{width}}  {repr(r['default']):<{dwidth}}  {r['help']}{tag}")
    out.append(f"common options of every defense (Python keywords): {', '.join(COMMON_OPTIONS)}")
    if not reference:
        from .recipes import ROBUST

        robust = ROBUST.get(name)
        out.append("recipes (--recipe, recipe=): published (the defaults above)" + (
            "; robust: " + ", ".join(f"{k}={v!r}" for k, v in robust.items()) if robust else
            "; no robust recipe measured yet"))
    return "\n".join(out)


class ListOptionsAction(argparse.Action):
    """``--list-options``: print the settings of the defense given before it (all five when none was) and exit,
    like ``--help``: no other argument is required."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("nargs", 0)
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .defenses import DEFENSES

        chosen = getattr(namespace, "defense", None)
        reference = bool(getattr(namespace, "reference", False))
        if chosen is not None and chosen not in DEFENSES:
            parser.error(f"unknown defense {chosen!r}; valid: {', '.join(DEFENSES)}")
        print("\n\n".join(format_options(n, reference) for n in ([chosen] if chosen else DEFENSES)))
        sys.stdout.flush()
        parser.exit(0)
