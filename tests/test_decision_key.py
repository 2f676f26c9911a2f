"""The decision key: what makes two runs "the same decision" (and a rerun "already decided")."""

from pathlib import Path

from flows.steps import decision_key
from tasks.config.loading import load_settings
from tasks.data.version import DataVersion
from tests.conftest import REPO

DATA = DataVersion(Path("c.csv"), Path("e.csv"), "c" * 32, "e" * 32)
HOST = {"cpu_model": "AMD EPYC 7B13", "cpu_flags": "avx avx2 fma", "cpu_count": "2", "machine": "x86_64"}


def test_decision_key_is_stable_for_the_same_inputs():
    settings = load_settings(REPO / "params.yaml")
    assert decision_key("src", DATA, settings, HOST, "aws-c6a.large") == decision_key("src", DATA, settings, dict(HOST),
                                                                                      "aws-c6a.large")


def test_decision_key_changes_with_the_host_it_was_measured_on():
    settings = load_settings(REPO / "params.yaml")
    here = decision_key("src", DATA, settings, HOST, "aws-c6a.large")
    vnni = {**HOST, "cpu_flags": "avx avx2 fma avx512f avx512_vnni"}
    assert decision_key("src", DATA, settings, vnni, "aws-c6a.large") != here
    assert decision_key("src", DATA, settings, {**HOST, "cpu_model": "Intel Xeon"}, "aws-c7i.large") != here
    assert decision_key("src", DATA, settings, HOST, "aws-c7i.large") != here


def test_decision_key_changes_with_data_and_bar():
    settings = load_settings(REPO / "params.yaml")
    here = decision_key("src", DATA, settings, HOST, "p")
    other_data = DataVersion(Path("c.csv"), Path("e.csv"), "d" * 32, "e" * 32)
    stricter = settings.model_copy(update={"quality_bar": settings.quality_bar.model_copy(update={"min_accuracy": 0.9})})
    assert decision_key("src", other_data, settings, HOST, "p") != here
    assert decision_key("src", DATA, stricter, HOST, "p") != here
