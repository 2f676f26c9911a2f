"""Reading params.yaml: parse, validate every section and every recipe config, resolve paths."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from tasks.config.search_space import expand_all
from tasks.config.settings import Settings, SettingsError
from tasks.recipes.base import parse_config


def load_settings(path: str | Path) -> Settings:
    """Read and validate params.yaml.

    Relative data paths are resolved against the folder that holds the file, so the same
    params.yaml works from any working directory.

    Raises:
        SettingsError: with one line naming the bad key and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"params file {path} not found: pass --params PATH to a params.yaml (see the README)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}): fix the syntax") from exc
    if not raw:
        raise SettingsError(f"{path} is empty: it needs at least the 'quantize' and 'cost' sections, and 'data' "
                            "(or 'text_data' for a language model); start from the repository's params.yaml")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SettingsError(
            f"{path}: '{where}': {first['msg'].removeprefix('Value error, ')} ({exc.error_count()} problem(s)); fix params.yaml"
        ) from exc
    # Recipe configs (every point of a declared grid) are checked now, not when the recipe runs.
    points = expand_all(settings.quantize.candidates)
    for candidate in points:
        parse_config(candidate.recipe, candidate.config, candidate.name)
    # Checked even when the search is off: a typo there would surface only once it is switched on.
    parse_config("int8-dynamic", settings.search.base_config, "search.base_config")
    names = [c.name for c in points]
    if len(set(names)) != len(names):
        raise SettingsError(f"{path}: quantize.candidates expand to duplicate names; rename a candidate")
    if settings.qat.target is not None and settings.qat.target not in names:
        raise SettingsError(f"{path}: 'qat.target': {settings.qat.target!r} is not a candidate; use one of "
                            f"{', '.join(names)} (or null for the cheapest failing one)")
    return _resolve_paths(settings, path.parent.resolve())


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    update = {}
    data = settings.data
    if data is not None:
        update["data"] = data.model_copy(update={
            "train_csv": _absolute(data.train_csv, base),
            "test_csv": _absolute(data.test_csv, base),
            "output_dir": _absolute(data.output_dir, base),
            "mirror_url": _absolute_mirror(data.mirror_url, base),
        })
    text = settings.text_data
    if text is not None:
        update["text_data"] = text.model_copy(update={
            "calibration_txt": _absolute(text.calibration_txt, base),
            "evaluation_txt": _absolute(text.evaluation_txt, base),
            "mirror_url": _absolute_mirror(text.mirror_url, base),
        })
    registry = settings.registry
    uri = registry.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(_absolute(Path(uri[len("sqlite:///"):]), base))
    location = registry.artifact_location
    if location is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", location):  # a path, not a URI
        location = str(_absolute(Path(location), base))
    update["registry"] = registry.model_copy(update={"tracking_uri": uri, "artifact_location": location})
    return settings.model_copy(update=update)


def _absolute_mirror(mirror_url: str | None, base: Path) -> str | None:
    """A mirror given as a relative folder is relative to the params file; a URL is left alone."""
    return mirror_url if mirror_url is None or "://" in mirror_url else str(_absolute(Path(mirror_url), base))


def _absolute(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def with_fleet(settings: Settings, fleet: list[str]) -> Settings:
    """`settings` with cost.fleet replaced (`requant run --fleet`), checked as params.yaml's would be.

    Raises:
        SettingsError: a name is not a profile, or its profile has no work_pool.
    """
    try:
        cost = type(settings.cost).model_validate({**settings.cost.model_dump(), "fleet": fleet})
    except ValidationError as exc:
        raise SettingsError(f"--fleet {','.join(fleet)}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}; "
                            "name profiles of cost.hardware_profiles that have a work_pool") from None
    return settings.model_copy(update={"cost": cost})
