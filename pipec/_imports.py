"""Import a Python file as a module under a given name (plan stage files, model factories)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_file(path: Path, module_name: str) -> ModuleType:
    """Execute ``path`` as module ``module_name`` and register it in ``sys.modules``.

    Raises ``ImportError`` when ``path`` cannot be imported as Python, and
    re-raises whatever executing it raises, leaving ``sys.modules`` as it was.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
