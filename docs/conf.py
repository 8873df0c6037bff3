"""Sphinx configuration: the API reference of lightning_chaos, generated from its docstrings.

Every module gets a page (``autosummary`` with ``:recursive:``), so modules that are added, split or renamed
appear without editing these files. Nitpicky mode checks the project's own cross-references; references
into other projects are not looked up (no intersphinx: the build must work offline) and are listed in
``nitpick_ignore_regex`` below.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, whichever copy of the package is installed

import lightning_chaos  # noqa: E402

project = "lightning_chaos"
author = "lightning_chaos developers"
copyright = "lightning_chaos developers"
release = version = lightning_chaos.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Training as a dynamical system", "page_width": "1100px"}

# --- autodoc, autosummary, napoleon ------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True


def _modules() -> dict[str, ModuleType]:
    modules: dict[str, ModuleType] = {"lightning_chaos": lightning_chaos}
    for info in pkgutil.walk_packages(lightning_chaos.__path__, "lightning_chaos."):
        modules[info.name] = importlib.import_module(info.name)
    return modules


def _exporter(modules: dict[str, ModuleType], modname: str, name: str, obj: object) -> str | None:
    """``lightning_chaos`` if its ``__all__`` exports ``obj`` as ``name`` (from a submodule), else ``None``.

    Only the top-level public API is documented under the package name. The core's grouped ``__all__`` is a
    convenience for imports; its names stay documented in the module that defines them, where the
    references of their docstrings resolve.
    """
    top = modules["lightning_chaos"]
    if modname != top.__name__ and name in top.__all__ and getattr(top, name) is obj:
        return top.__name__
    return None


def _template_context() -> dict[str, Any]:
    """What the module template (``_templates/autosummary/module.rst``) needs to know about each module.

    ``documented_with_package``: a public class is documented once, under the name users import
    (``lightning_chaos.CGD``); autodoc registers its defining path (``lightning_chaos.optim.CGD``) as an
    alias, so references by either name resolve. The pages of the modules that define or re-export it
    leave it out (``:exclude-members:``) and link to it.

    ``public_names``: per package with an ``__all__``, the exported names documented on its page, for a
    summary table at the top.
    """
    modules = _modules()
    documented: dict[str, list[dict[str, str]]] = {}
    public: dict[str, list[str]] = {}
    for modname, module in modules.items():
        exported = getattr(module, "__all__", None)
        if exported is not None:
            names = list(exported)
        else:
            names = [n for n, o in vars(module).items() if getattr(o, "__module__", None) == modname]
        for name in names:
            obj = getattr(module, name, None)
            package = _exporter(modules, modname, name, obj) if inspect.isclass(obj) else None
            if package is not None:
                documented.setdefault(modname, []).append({"name": name, "public": f"{package}.{name}"})
        if exported and modname == "lightning_chaos":
            elsewhere = {item["name"] for item in documented.get(modname, [])}
            public[modname] = [name for name in exported if name not in elsewhere]
    # packages whose __all__ gathers names defined in their modules: their page links to the modules
    gathering = [m for m, module in modules.items() if hasattr(module, "__path__") and m != "lightning_chaos"]
    return {"documented_with_package": documented, "public_names": public, "gathering": gathering}


autosummary_context = _template_context()

# --- nitpicky: the project's own references must resolve; other projects' are not looked up --------------
nitpicky = True
_THIRD_PARTY = [
    "torch",
    "lightning",
    "torchmetrics",
    "jsonargparse",
    "tensorboard",
    "numpy",
    "matplotlib",
    "sklearn",
]
_ALIASES = [r"Tensor", r"Optimizer", r"nn\..+", r"F\..+", r"pl\..+", r"np\..+", r"plt\..+"]
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_THIRD_PARTY)})(\..+)?"),
    (r"py:.*", rf"({'|'.join(sorted(sys.stdlib_module_names))})\..+"),  # collections.abc.Callable, ...
    *((r"py:.*", alias) for alias in _ALIASES),  # names as the code imports them: `from torch import nn`
    (r"py:class", r"lightning_chaos\..*\.T"),  # type variables of generic signatures
    (r"py:class", r"dict\[str"),  # Sphinx splits the dataclass signature ``dict[str, Tensor]`` at the comma
]


def _is_private(cls: type) -> bool:
    path = f"{cls.__module__}.{cls.__qualname__}"
    return path.startswith("lightning_chaos.") and any(part.startswith("_") for part in path.split("."))


def _public_bases(app: Any, name: str, obj: object, options: Any, bases: list[Any]) -> None:
    """Show public classes under "Bases:".

    A private base (``callbacks._base.ProbeCallback``) has no page, so it is replaced by its own bases,
    recursively, up to the first public ones.
    """
    resolved: list[Any] = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        if inspect.isclass(base) and _is_private(base):
            pending[:0] = list(base.__bases__)
        elif base not in resolved:
            resolved.append(base)
    bases[:] = resolved


def setup(app: Any) -> None:
    """Connect the hooks above."""
    app.connect("autodoc-process-bases", _public_bases)
