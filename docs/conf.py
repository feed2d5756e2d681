"""Sphinx configuration: ``python -m sphinx -W --keep-going -b html -q docs docs/_build/html``."""

import importlib
import inspect

from sphinx.util import logging

import atlasdist

logger = logging.getLogger(__name__)

project = "atlasdist"
author = "the atlasdist developers"
copyright = "the atlasdist developers"
version = release = atlasdist.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Everything generated stays in git-ignored folders (docs/_build, docs/api/generated). The API
# page uses autosummary tables without :toctree:, so nothing is generated into the source tree.
exclude_patterns = ["_build", "api/generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

nitpicky = False
add_module_names = False

# Google-style docstrings: "Arguments:", "Returns:", "Example:" and "References:" are napoleon's
# own section names, so no custom sections are needed.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Document what a member says about itself: inherited torch/Pyro/nn.Module docstrings
# (forward, extra_repr, log_abs_det_jacobian, ...) would only repeat the base classes.
autodoc_inherit_docstrings = False
autosummary_generate = False

html_theme = "furo"
html_title = f"atlasdist {release}"


def _public_bases(app, name, obj, options, bases):
    """Shows a private base class as its own bases."""
    public = []
    for base in bases:
        public.extend(base.__bases__ if base.__name__.startswith("_") else [base])
    bases[:] = public


# Modules whose whole ``__all__`` api.rst must document: a public name added without a line in
# api.rst fails the (-W) build instead of silently missing from the reference.
_DOCUMENTED_MODULES = (
    "atlasdist",
    "atlasdist.transforms",
    "atlasdist.geometry",
    "atlasdist.charts",
    "atlasdist.training",
    "atlasdist.distributions",
    "atlasdist.manifolds",
    "atlasdist.infer",
)


def _resolve(path):
    module, _, name = path.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            name = f"{head}.{name}"
            continue
        for part in name.split("."):
            obj = getattr(obj, part, None)
        return obj
    return None


def _check_api_complete(app, env):
    # A public object counts as documented under any of its paths (a re-export in
    # ``atlasdist`` is documented by its entry in the defining module); submodules are pages,
    # not objects.
    documented = {id(_resolve(path)) for path in env.get_domain("py").objects}
    for module in _DOCUMENTED_MODULES:
        for name in importlib.import_module(module).__all__:
            obj = getattr(importlib.import_module(module), name)
            if inspect.ismodule(obj):
                continue
            if id(obj) not in documented:
                logger.warning("%s.%s is public but not documented in docs/api.rst", module, name)


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("env-check-consistency", _check_api_complete)
