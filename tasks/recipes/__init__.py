"""Quantization recipes. Every module here defines one registered `Recipe` (base.py: the interface).

May import: core. Recipes are units: a recipe knows its inputs, not the flow around it.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
