from pathlib import Path

import pytest
import yaml

from tasks.config.loading import load_settings
from tasks.config.settings import SettingsError
from tasks.core.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path, mutate) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_load_settings_reads_repo_params_and_resolves_paths_against_the_file():
    settings = load_settings(REPO / "params.yaml")
    assert settings.data.train_csv == (REPO.parent / "shared/data/banking77/train.csv").resolve()
    assert settings.registry.tracking_uri == f"sqlite:///{REPO / 'mlflow.db'}"
    assert {c.recipe for c in settings.quantize.candidates} >= {"fp32", "fp16", "int8-dynamic", "int8-static",
                                                                 "int4-weight-only", "mixed"}


def test_load_settings_names_the_bad_key_when_a_value_is_invalid(tmp_path):
    path = write_params(tmp_path, lambda p: p["quality_bar"].update(max_relative_accuracy_loss=-1))
    with pytest.raises(SettingsError, match=r"quality_bar\.max_relative_accuracy_loss"):
        load_settings(path)


def test_load_settings_refuses_a_misspelt_key(tmp_path):
    path = write_params(tmp_path, lambda p: p["data"].update(calibraton_size=5))
    with pytest.raises(SettingsError, match="calibraton_size"):
        load_settings(path)


def test_load_settings_refuses_unknown_recipe_listing_known_ones(tmp_path):
    path = write_params(tmp_path, lambda p: p["quantize"]["candidates"].append({"name": "x", "recipe": "int3"}))
    with pytest.raises(RecipeError, match="unknown recipe 'int3'.*int8-dynamic"):
        load_settings(path)


def test_load_settings_refuses_bad_recipe_config(tmp_path):
    path = write_params(tmp_path, lambda p: p["quantize"]["candidates"].append(
        {"name": "x", "recipe": "int4-weight-only", "config": {"block_size": 48}}))
    with pytest.raises(RecipeError, match="power of two"):
        load_settings(path)


def test_load_settings_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(SettingsError, match="--params"):
        load_settings(tmp_path / "nope.yaml")


def test_host_profile_auto_matches_cpu_and_explains_a_miss():
    cost = load_settings(REPO / "params.yaml").cost
    assert cost.host_profile("AMD EPYC 7R13 Processor").name == "aws-c6a.large"
    with pytest.raises(SettingsError, match="no hardware profile matches"):
        cost.host_profile("Some Unknown CPU")
