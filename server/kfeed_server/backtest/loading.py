"""User strategies: loaded from Python modules the server is configured to trust.

``kfeed serve --strategy-module PKG.MOD`` (repeatable) imports ``PKG.MOD``; the Python entry-point
group ``kfeed.strategies`` names modules or ``Strategy`` classes that installed packages provide
(``[project.entry-points."kfeed.strategies"] mine = "my_pkg.strategies"``). Every ``Strategy``
subclass with a ``name`` defined in a loaded module is registered (the ``@register_strategy``
decorator does the same at import). The worker processes import the same modules before a run,
so a strategy runs there, never in the server process. Loading runs the module's code: only
configure modules you trust.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from importlib.metadata import entry_points
from types import ModuleType

from kfeed_server.backtest.strategy import Strategy, StrategyRegistry, default_registry

ENTRY_POINT_GROUP = "kfeed.strategies"
"""The entry-point group of installed strategy packages."""


class StrategyLoadError(Exception):
    """A configured strategy module could not be loaded (the message says which and why)."""


def _register_module(module: ModuleType, registry: StrategyRegistry) -> list[str]:
    names = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Strategy) and cls.__module__ == module.__name__ and cls.name:
            if cls.name not in registry:
                registry.register(cls)
            names.append(cls.name)
    return names


def load_strategy_modules(
    modules: Sequence[str], registry: StrategyRegistry = default_registry
) -> list[str]:
    """Imports ``modules`` and registers their strategies; returns the names registered.
    StrategyLoadError when a module cannot be imported or defines a clashing name."""
    names: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
            names.extend(_register_module(module, registry))
        except Exception as error:
            raise StrategyLoadError(
                f"cannot load strategy module {module_name!r}: {type(error).__name__}: {error}"
            ) from error
    return names


def entry_point_modules() -> list[str]:
    """The modules the installed ``kfeed.strategies`` entry points name (a class entry point
    counts as its module)."""
    return sorted({ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)})
