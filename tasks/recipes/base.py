"""A quantization recipe: a registered unit with a typed config declared in one place.

Adding a precision means adding one module under tasks/recipes/ with one `Recipe` subclass;
it registers itself when defined. Heavy imports (onnxruntime, torch) stay inside `run`, so
listing recipes and validating params.yaml stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.core.errors import RecipeError


class RecipeConfig(BaseModel):
    """Base of every recipe config: unknown keys are refused (they are typos)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantizeInputs:
    """What every recipe starts from, prepared once per flow run."""

    fp32_model: Path
    optimized_model: Path
    calibration_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)

    def calibration_digest(self) -> str:
        """Content hash of the tokenized calibration feeds (what a calibrated recipe depends on)."""
        digest = hashlib.sha256()
        for feed in self.calibration_feeds:
            for name in sorted(feed):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(feed[name]).tobytes())
        return digest.hexdigest()[:16]


class Recipe(ABC):
    """One way of turning the FP32 graph into a candidate."""

    registry: ClassVar[dict[str, type["Recipe"]]] = {}
    id: ClassVar[str]
    precision: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]] = RecipeConfig
    # Whether the candidate must contain lower-precision nodes (false only for the FP32 reference).
    lowers_precision: ClassVar[bool] = True
    # Whether the result depends on the calibration set (then a new calibration set means a rebuild).
    uses_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls):
            Recipe.registry[cls.id] = cls

    @abstractmethod
    def run(self, inputs: QuantizeInputs, config: RecipeConfig, out_dir: Path) -> Path:
        """Write the candidate's ONNX file under out_dir and return its path."""


def _load_all() -> None:
    # Importing the package imports every recipe module, which registers its class.
    import tasks.recipes  # noqa: F401


def recipe_class(recipe_id: str) -> type[Recipe]:
    """Return the registered recipe class.

    Raises:
        RecipeError: the id is unknown; the message lists the known ones.
    """
    _load_all()
    if recipe_id not in Recipe.registry:
        raise RecipeError(
            f"unknown recipe '{recipe_id}': use one of {', '.join(sorted(Recipe.registry))} in params.yaml quantize.candidates"
        )
    return Recipe.registry[recipe_id]


def parse_config(recipe_id: str, raw: dict, candidate: str = "") -> RecipeConfig:
    """Validate a candidate's config against its recipe's declared fields.

    Raises:
        RecipeError: unknown recipe or invalid config, in one line.
    """
    cls = recipe_class(recipe_id)
    try:
        return cls.Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(config)"
        raise RecipeError(
            f"candidate '{candidate or recipe_id}' (recipe {recipe_id}): config '{where}': {first['msg']}; "
            f"fields: {', '.join(cls.Config.model_fields)}"
        ) from exc


def config_hash(recipe_id: str, config: RecipeConfig, source_id: str, calibration_digest: str = "") -> str:
    """Content address of a candidate.

    Everything that can change the built graph is in it: the source model, the recipe and its
    config, the recipe's own code, the onnx and onnxruntime versions that run it, and (for a recipe
    that calibrates) the calibration data. So a data change or an upgrade never reuses a stale build.
    """
    cls = recipe_class(recipe_id)
    payload = json.dumps({"source": source_id, "recipe": recipe_id, "config": config.model_dump(mode="json"),
                          "code": _recipes_code_digest(), "runtime": runtime_versions(),
                          "calibration": calibration_digest if cls.uses_calibration else ""}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def runtime_versions() -> dict[str, str]:
    """Versions of the libraries that build and run candidates (part of every content address)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("onnx", "onnxruntime", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


@functools.lru_cache(maxsize=1)
def _recipes_code_digest() -> str:
    # Every recipe module: recipes share helpers (int8_dynamic's quantizer, fp32's graph choice), so
    # any change under tasks/recipes/ counts as a change of every recipe.
    folder = Path(inspect.getfile(Recipe)).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def describe_recipes() -> list[dict]:
    """Id, precision, docstring and config fields of every registered recipe (for `requant recipes`)."""
    _load_all()
    rows = []
    for recipe_id, cls in sorted(Recipe.registry.items()):
        fields = {name: (f.description or "") + (f" (default: {f.get_default(call_default_factory=True)!r})" if not f.is_required() else "")
                  for name, f in cls.Config.model_fields.items()}
        rows.append({"id": recipe_id, "precision": cls.precision, "about": (cls.__doc__ or "").strip().splitlines()[0],
                     "config": fields})
    return rows


def is_baseline(built) -> bool:
    """Whether a built candidate (anything with `recipe` and `is_production`) is the source model's
    FP32 graph: always scored, timed and served, so savings are never unpriced."""
    return built.recipe == "fp32" and not built.is_production
