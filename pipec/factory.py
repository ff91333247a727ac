"""Model factories: ``FILE.py:FACTORY`` specs used by the CLI and generated ``run.py``.

A factory is a function of no arguments returning a dict with ``model`` and
``example_inputs``, and optionally ``example_kwargs``, ``loss_fn`` and
``target``. The plan records the spec so ``run.py`` and ``pipec run`` can build
the loss and an example batch again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipec._imports import import_file
from pipec.errors import ConfigError

_KNOWN_KEYS = {"model", "example_inputs", "example_kwargs", "loss_fn", "target"}


@dataclass(frozen=True)
class FactoryResult:
    """What a factory returned, checked."""

    spec: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: Mapping[str, Any] = field(default_factory=dict)
    loss_fn: Callable[..., Any] | None = None
    target: Any = None


def split_spec(spec: str) -> tuple[Path, str]:
    """``"examples/gpt2.py:make"`` -> (path, "make")."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise ConfigError(
            f"factory: expected FILE.py:FACTORY such as examples/gpt2.py:make, found {spec!r}"
        )
    return Path(path_text), name


def resolve_spec(spec: str, base: Path | None = None) -> str:
    """The spec with its file made absolute (relative to ``base`` or the cwd)."""
    path, name = split_spec(spec)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return f"{path.resolve()}:{name}"


def load_factory(spec: str) -> FactoryResult:
    """Import ``FILE.py``, call ``FACTORY()`` and check what it returns."""
    path, name = split_spec(spec)
    if not path.is_file():
        raise ConfigError(f"factory: file {str(path)!r} does not exist; give the path to a .py file")
    module_name = f"pipec_factory_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = import_file(path, module_name)
        except ImportError as exc:
            raise ConfigError(f"factory: cannot import {str(path)!r} as a Python module; give the path to a .py file") from exc
        except Exception as exc:
            raise ConfigError(
                f"factory: importing {str(path)!r} failed: {type(exc).__name__}: {exc}; "
                "fix the file (run `python FILE.py` to see the traceback)"
            ) from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            f"factory: expected a function {name!r} in {str(path)!r}, found none; "
            f"use one of the callables there: {', '.join(found) or 'none'}"
        )
    try:
        result = fn()
    except Exception as exc:
        raise ConfigError(
            f"factory {spec!r} raised {type(exc).__name__}: {exc}; it must build and return the "
            "dict without raising -- fix the factory (run it by hand to see the traceback)"
        ) from exc
    if not isinstance(result, Mapping):
        raise ConfigError(
            f"factory {spec!r} returned {type(result).__name__}; it must return a dict with "
            "'model' and 'example_inputs' (and optionally example_kwargs, loss_fn, target)"
        )
    unknown = set(result) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(
            f"factory {spec!r} returned unknown keys {sorted(unknown)}; expected only {sorted(_KNOWN_KEYS)}: "
            "rename or drop the others"
        )
    model = result.get("model")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"factory {spec!r}: 'model' must be a torch.nn.Module, found {type(model).__name__}; "
            "return the model itself under 'model'"
        )
    if "example_inputs" not in result:
        raise ConfigError(
            f"factory {spec!r}: expected the dict to hold 'example_inputs', found keys {sorted(result)}; "
            "add one example batch, e.g. 'example_inputs': (torch.randn(8, 16),)"
        )
    inputs = result["example_inputs"]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    loss_fn = result.get("loss_fn")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(
            f"factory {spec!r}: 'loss_fn' must be callable, found {type(loss_fn).__name__}; "
            "pass a function (output, target) -> loss, or leave it out"
        )
    return FactoryResult(
        spec=spec,
        model=model,
        example_inputs=inputs,
        example_kwargs=dict(result.get("example_kwargs") or {}),
        loss_fn=loss_fn,
        target=result.get("target"),
    )
