"""User code named in a config: ``"package.module:function"`` import paths, and callables from Python.

A config stays plain data (YAML, Ray's trial configs, checkpoints), so user code is always named by
a string. From YAML that string is an import path, resolved against the working directory and
``PYTHONPATH``. From the Python API a callable is accepted too: :func:`register` files it under its
``module:qualname`` name in this process's registry, and the sweep ships the registry to Ray's
workers (:func:`pickled` / :func:`install`), pickled *by value* for modules outside site-packages,
so a function defined in a script, a notebook or a test file runs on a worker that could not
import it.

Every failure is a one-line :class:`~oialr_tune.errors.UserError` naming the config key: module not
found, attribute missing or not callable, and (through :func:`call`) the user's function raising.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
from collections.abc import Callable, Mapping
from typing import Any

from oialr_tune.errors import UserError, one_line

# name -> callable registered in this process (Python API) or installed from the sweep's driver.
_REGISTRY: dict[str, Callable[..., Any]] = {}
# Prefixes of names resolved by a model zoo, not by import: "torchvision:resnet18", "timm:vit_tiny".
ZOO_PREFIXES = ("torchvision:", "timm:")


def is_import_path(name: str) -> bool:
    """``"module:attr"`` (not a zoo name like ``"timm:vit_tiny_patch16_224"``)."""
    return ":" in name and not name.startswith(ZOO_PREFIXES)


def check_syntax(name: str, key: str) -> None:
    """Check the form ``package.module:function`` without importing anything (config validation)."""
    module, _, attr = name.partition(":")
    parts = module.split(".") + attr.split(".")
    if not module or not attr or not all(p.isidentifier() for p in parts):
        raise UserError(f"{key}: expected an import path 'package.module:function', got {name!r}")


def register(fn: Callable[..., Any]) -> str:
    """File a callable under ``module:qualname`` and return that name, which configs then carry.

    The name is also the record of what ran (in ``sweep.yaml``, checkpoints and model files);
    where it is importable (a module-level function) a later process can rebuild from it.
    """
    if not callable(fn):
        raise UserError(f"expected a callable or an import path, got {fn!r}")
    name = f"{getattr(fn, '__module__', None) or '__main__'}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    _REGISTRY[name] = fn
    return name


def is_registered(name: str) -> bool:
    """Whether `name` is a callable this process registered (the caller's own code, not a file's say-so)."""
    return name in _REGISTRY


def name_of(value: str | Callable[..., Any]) -> str:
    """An import path as given, or the registered name of a callable."""
    return value if isinstance(value, str) else register(value)


def _import_module(module: str, key: str) -> Any:
    # The console script's sys.path[0] is its own bin folder: add the working directory, as
    # `python -m` would, so "my_models:build" finds ./my_models.py.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        where = "" if missing == module else f" (importing it needs {missing!r}: {e})"
        raise UserError(
            f"{key}: cannot import module {module!r}{where}; it must be importable from the working "
            f"directory or PYTHONPATH"
        ) from None
    except Exception as e:
        raise UserError(f"{key}: importing module {module!r} raised {one_line(e)}") from None


def resolve(name: str, key: str) -> Callable[..., Any]:
    """The callable an import path (or a registered name) names. Raises UserError naming `key`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    check_syntax(name, key)
    module_name, _, attr = name.partition(":")
    obj: Any = _import_module(module_name, key)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{key}: {name} is a {type(obj).__name__}, not a function")
    return obj


def call(fn: Callable[..., Any], name: str, key: str, *args: Any, **kwargs: Any) -> Any:
    """Call user code; anything it raises becomes one UserError line naming `key` and the message."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{key}: {name} raised {one_line(e)}") from None


# --- shipping user code to Ray's workers -------------------------------------------------------------


def _outside_site_packages(module_name: str) -> bool:
    """True for a user's own module (a script, a test file, a project folder), not an installed one."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or path is None or module_name.split(".")[0] == "oialr_tune":
        return False
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return not any(os.path.abspath(path).startswith(os.path.abspath(p) + os.sep) for p in installed)


def code_keys(cfg: Mapping[str, Any], *, catalogue: bool = True) -> list[tuple[str, Any]]:
    """(dotted key, value) of each key of a trainer config (plain data) that may name user code.

    The one list of those keys: ``model.name`` and ``data.name`` (an import path or a catalogue
    name; left out with ``catalogue=False``), ``trainable``, ``lightning.module``,
    ``lightning.datamodule``, ``loss`` and ``metrics.<name>`` (import paths only).
    """
    named = [("model.name", (cfg.get("model") or {}).get("name")), ("data.name", (cfg.get("data") or {}).get("name"))]
    lightning = cfg.get("lightning") or {}
    return [*(named if catalogue else []), ("trainable", cfg.get("trainable")),
            ("lightning.module", lightning.get("module")), ("lightning.datamodule", lightning.get("datamodule")),
            ("loss", cfg.get("loss")), *((f"metrics.{k}", v) for k, v in (cfg.get("metrics") or {}).items())]


def names_in(cfg: Mapping[str, Any]) -> list[str]:
    """Every import path a trainer config (as plain data) names (see `code_keys`)."""
    return [n for _, n in code_keys(cfg) if isinstance(n, str) and is_import_path(n)]


def uses_user_code(cfg: Mapping[str, Any]) -> bool:
    """Whether a trainer config (plain data) names anything beyond the built-in catalogue and task."""
    model = str(cfg.get("model", {}).get("name", ""))
    return bool(names_in(cfg)) or model.startswith(ZOO_PREFIXES) or cfg.get("task") == "regression"


def pickled(cfg: Mapping[str, Any]) -> bytes:
    """The user callables `cfg` names, resolved here and pickled for a worker (see the module doc)."""
    import cloudpickle

    fns = {name: resolve(name, name) for name in names_in(cfg)}
    # The user's modules, and their neighbours (my_loop.py importing my_data.py), travel by value.
    folders = set()
    for fn in fns.values():
        module = getattr(fn, "__module__", None)
        if module and _outside_site_packages(module):
            folders.add(os.path.dirname(os.path.abspath(sys.modules[module].__file__)))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and os.path.dirname(os.path.abspath(path)) in folders and _outside_site_packages(name):
            cloudpickle.register_pickle_by_value(module)
    return cloudpickle.dumps(fns)


def install(blob: bytes) -> None:
    """In a worker: make the driver's callables resolvable by their names (see :func:`pickled`)."""
    import cloudpickle

    _REGISTRY.update(cloudpickle.loads(blob))
