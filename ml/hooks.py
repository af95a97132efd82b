"""Hooks named in the settings as ``module:function``: a seam for extra checks and for fault injection."""

from __future__ import annotations

import importlib
from typing import Any

from ml.settings import ConfigurationError


def call_hook(hook: str, **arguments: Any) -> None:
    """Call ``module:function`` with keyword arguments; a hook that cannot be imported is a configuration error."""
    module_name, _, function_name = hook.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(f"hook {hook!r} cannot be imported: {error}") from error
    function(**arguments)
