import pytest

from tasks.config.search_space import expand, expand_all
from tasks.config.settings import CandidateSpec
from tasks.core.errors import RecipeError


def test_expand_makes_one_candidate_per_grid_point():
    spec = CandidateSpec(name="d", recipe="int8-dynamic", config={"per_channel": [False, True], "graph": ["optimized", "plain"]})
    points = expand(spec)
    assert len(points) == 4
    assert {p.name for p in points} >= {"d[per_channel=false,graph=optimized]", "d[per_channel=true,graph=plain]"}


def test_expand_treats_a_plain_list_for_a_list_field_as_one_value():
    spec = CandidateSpec(name="s", recipe="int8-static", config={"op_types": ["MatMul", "Gemm"]})
    assert expand(spec) == [spec]


def test_expand_searches_a_list_field_given_a_list_of_lists():
    spec = CandidateSpec(name="s", recipe="int8-static",
                         config={"op_types": [["MatMul"], ["MatMul", "Gemm"]], "calibration_method": ["minmax", "entropy"]})
    assert len(expand_all([spec])) == 4


def test_grid_points_are_validated_when_settings_load(tmp_path):
    import yaml

    from tasks.config.loading import load_settings
    from tests.test_settings import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["quantize"]["candidates"] = [{"name": "b", "recipe": "int4-weight-only", "config": {"block_size": [32, 48]}}]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(RecipeError, match=r"b\[block_size=48\].*power of two"):
        load_settings(path)
