"""Any model, named on the command line: ``package.module:factory`` (or ``path/to/file.py:factory``) with keyword
arguments, besides the built-in names of ``fastpurify.models.ARCHS``.

``resolve_model(spec, kwargs)`` imports the factory and calls it; every way this can go wrong (no colon, a module
that is not found, a missing attribute, something not callable, a factory that raises or returns no ``nn.Module``)
is a ``ModelSpecError`` (a ``ValueError``) naming the spec and what to do, so that the command line prints one line.

Example:
    >>> resolve_model("small_vgg", {"num_classes": 43}).classifier.out_features
    43
    >>> resolve_model("torch.nn:Linear", {"in_features": 4, "out_features": 2}).weight.shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from torch import nn

__all__ = ["ModelSpecError", "bench_model", "import_factory", "is_builtin", "load_model", "model_from_args",
           "parse_model_kwargs", "resolve_model"]

_EXAMPLE = "e.g. --model mypkg.net:build or --model path/to/net.py:build"


class ModelSpecError(ValueError):
    """A ``--model`` spec (or its ``--model-kwargs``) that cannot give a model."""


def is_builtin(spec: str) -> bool:
    """True for a built-in architecture name (a key of ``fastpurify.models.ARCHS``)."""
    from . import ARCHS

    return spec in ARCHS


def parse_model_kwargs(text: Optional[str], flag: str = "--model-kwargs") -> dict:
    """The keyword arguments of a factory from a JSON object text (None or empty: no arguments).

    Example:
        >>> parse_model_kwargs('{"num_classes": 10}')
        {'num_classes': 10}
    """
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{flag} {text!r} is not valid JSON ({e.msg} at character {e.pos}); give an object, "
                             "e.g. '{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise ModelSpecError(f"{flag} {text!r} is a JSON {type(value).__name__}, not an object of keyword arguments; "
                             "e.g. '{\"num_classes\": 10}'")
    return value


def _split(spec: str) -> Tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"--model must be a non-empty string, got {spec!r} ({_EXAMPLE})")
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr or os.sep in attr or "/" in attr:
        from . import ARCHS

        raise ModelSpecError(f"--model {spec!r}: expected MODULE:FACTORY ({_EXAMPLE}) or one of the built-in names "
                             f"{', '.join(ARCHS)}")
    return where, attr


def _ensure_cwd_importable() -> None:
    # ``python -m`` puts the current directory first on sys.path; the ``fastpurify`` console script does not.
    cwd = os.getcwd()
    if not any(p in ("", ".") or os.path.abspath(p) == cwd for p in sys.path):
        sys.path.insert(0, cwd)


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ModelSpecError(f"--model {spec!r}: the file {path} does not exist")
    name = f"_fastpurify_user_model_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    # Its own folder importable, so that the file can import its sibling modules (as running it would).
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ModelSpecError(f"--model {spec!r}: running {path} raised {type(e).__name__}: {e}") from None
    return module


def _import_module(spec: str, name: str):
    _ensure_cwd_importable()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and not (name == missing or name.startswith(missing + ".")):
            raise ModelSpecError(f"--model {spec!r}: importing {name} failed: it imports {missing!r}, which is not "
                                 "installed") from None
        shown = [p or "." for p in sys.path][:6]
        raise ModelSpecError(
            f"--model {spec!r}: no module named {missing or name!r} on sys.path ({', '.join(shown)}"
            f"{', ...' if len(sys.path) > 6 else ''}); run from the folder that holds it, add that folder to "
            "PYTHONPATH, or give a file: --model path/to/file.py:FACTORY") from None
    except Exception as e:
        raise ModelSpecError(f"--model {spec!r}: importing {name} raised {type(e).__name__}: {e}") from None


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``spec``: ``module.path:attr`` (``attr`` may be dotted, e.g. ``Net.build``) or
    ``path/to/file.py:attr``. The current directory is importable (as with ``python -m``)."""
    where, attr = _split(spec)
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _import_file(spec, Path(where).expanduser())
    else:
        module = _import_module(spec, where)
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = where if i == 0 else f"{where}:{'.'.join(attr.split('.')[:i])}"
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ModelSpecError(f"--model {spec!r}: {owner} has no attribute {part!r}"
                                 + (f"; its callables: {shown}" if names else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"--model {spec!r}: {attr} is a {type(obj).__name__}, not a callable that builds a "
                             "model")
    return obj


def _call(spec: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ModelSpecError(f"--model {spec!r}: the factory takes {sig}, and the keyword arguments {dict(kwargs)} "
                                 f"do not fit ({e}); set them with --model-kwargs") from None
    try:
        return factory(**kwargs)
    except Exception as e:
        raise ModelSpecError(f"--model {spec!r}: calling the factory with {dict(kwargs)} raised "
                             f"{type(e).__name__}: {e}") from None


def resolve_model(spec: str, kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A freshly built model: a built-in name of ``ARCHS`` (``kwargs`` may give ``num_classes``), or the result of
    ``factory(**kwargs)`` for ``spec`` = ``module.path:factory`` / ``path/to/file.py:factory``.

    Raises ``ModelSpecError`` (a ``ValueError``) with one line that names the spec and the fix.

    Example:
        >>> type(resolve_model("preact_resnet18")).__name__
        'PreActResNet18'
    """
    kwargs = dict(kwargs or {})
    if isinstance(spec, str) and is_builtin(spec):
        from . import ARCHS, build_model

        unknown = sorted(set(kwargs) - {"num_classes"})
        if unknown:
            raise ModelSpecError(f"--model {spec!r} (built in) takes only num_classes, got {unknown}; for other "
                                 "arguments use a factory of your own: --model MODULE:FACTORY")
        return build_model(spec, **kwargs) if kwargs else ARCHS[spec]()
    model = _call(spec, import_factory(spec), kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_from_args(args, *, default: str = "small_vgg") -> Tuple[str, dict]:
    """The command line's model choice ``(spec, kwargs)`` from ``--arch`` / ``--model`` / ``--model-kwargs``,
    checked before any loading: both given is an error, as are kwargs without ``--model``. Sets ``args.arch`` to
    the spec (the built-in default when neither is given), which is what results record."""
    arch, spec = getattr(args, "arch", None), getattr(args, "model", None)
    text = getattr(args, "model_kwargs", None)
    if arch is not None and spec is not None:
        raise ModelSpecError(f"--arch {arch} and --model {spec}: give one (--model takes the built-in names too)")
    if text is not None and spec is None:
        raise ModelSpecError("--model-kwargs needs --model MODULE:FACTORY (the factory it is passed to)")
    kwargs = parse_model_kwargs(text)
    if spec is None:
        spec = arch if arch is not None else default
        if not is_builtin(spec):
            from . import ARCHS

            raise ValueError(f"unknown architecture {spec!r}; valid names: {', '.join(ARCHS)} (or --model "
                             "MODULE:FACTORY for a model of your own)")
    elif not is_builtin(spec):
        _split(spec)  # the form is checked now; the import happens when the model is built
    args.arch = spec
    return spec, kwargs


def load_model(path, spec: str = "small_vgg", kwargs: Optional[Mapping[str, Any]] = None,
               map_location: Any = "cpu") -> nn.Module:
    """The checkpoint at ``path`` loaded into the model ``spec`` names (see ``resolve_model``), in eval mode.

    A built-in name infers its class count from the checkpoint unless ``kwargs`` gives ``num_classes``; a factory
    is called with ``kwargs`` first and the checkpoint then has to fit what it built.
    """
    from . import load_checkpoint  # the package attribute: tests replace it to prove nothing loads early

    kwargs = dict(kwargs or {})
    if is_builtin(spec) and set(kwargs) <= {"num_classes"}:
        return load_checkpoint(path, arch=spec, num_classes=kwargs.get("num_classes"), map_location=map_location)
    return load_checkpoint(path, model=resolve_model(spec, kwargs), map_location=map_location)


def bench_model(args) -> Optional[Callable[[], nn.Module]]:
    """``fastpurify bench``'s model choice: None for a built-in architecture (``args.arch`` names it), else a
    function building the ``--model`` factory's model, which needs ``--checkpoint`` (the synthetic workload trains
    a built-in architecture)."""
    spec, kwargs = model_from_args(args)
    if is_builtin(spec) and not kwargs:
        return None
    if getattr(args, "checkpoint", None) is None:
        raise ModelSpecError(f"--model {spec} (with --model-kwargs) needs --checkpoint CKPT: without one the bench "
                             "backdoors a built-in architecture (--arch) on synthetic data")
    return lambda: resolve_model(spec, kwargs)
