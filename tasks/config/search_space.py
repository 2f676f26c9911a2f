"""A search space declared next to the parameter it belongs to.

In params.yaml a recipe parameter that takes one value may be given a list, meaning "try these":

    - name: int8-dynamic
      recipe: int8-dynamic
      config: {per_channel: [false, true], graph: [optimized, plain]}

expands to four candidates. A parameter whose value is itself a list (op_types, keep_fp32) is
searched when given a list of lists.
"""

from __future__ import annotations

import itertools
import types
import typing

from tasks.config.settings import CandidateSpec
from tasks.recipes.base import recipe_class


def _takes_a_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_takes_a_list(arg) for arg in typing.get_args(annotation))
    return False


def search_dimensions(spec: CandidateSpec) -> dict[str, list]:
    """The config keys of a candidate that list alternatives, with their values."""
    fields = recipe_class(spec.recipe).Config.model_fields
    dims = {}
    for key, value in spec.config.items():
        if key not in fields or not isinstance(value, list) or not value:
            continue
        if not _takes_a_list(fields[key].annotation) or all(isinstance(v, list) for v in value):
            dims[key] = value
    return dims


def expand(spec: CandidateSpec) -> list[CandidateSpec]:
    """One candidate per point of the declared grid (the spec itself when nothing is searched)."""
    dims = search_dimensions(spec)
    if not dims:
        return [spec]
    keys = list(dims)
    out = []
    for values in itertools.product(*(dims[k] for k in keys)):
        point = dict(zip(keys, values))
        label = ",".join(f"{k}={_short(v)}" for k, v in point.items())
        out.append(spec.model_copy(update={"name": f"{spec.name}[{label}]", "config": {**spec.config, **point}}))
    return out


def expand_all(specs: list[CandidateSpec]) -> list[CandidateSpec]:
    """Expand every candidate's grid, keeping the order of params.yaml."""
    return [point for spec in specs for point in expand(spec)]


def _short(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)
