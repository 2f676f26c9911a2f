import pandas as pd
import pytest

from tasks.config.settings import DataSettings
from tasks.core.errors import DataError
from tasks.data.prepare import (
    CALIBRATION_FILE,
    LABEL,
    TEXT,
    build_sets,
    load_split,
    prepare,
    sha256_of,
    stratified_sample,
)


def frame(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label} query {i}", label) for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=[TEXT, LABEL])


def settings(tmp_path, **kw) -> DataSettings:
    # Small samples: the validation floor (min_calibration_rows, default 100) must not exceed them.
    kw = {"min_calibration_rows": 1, **kw}
    return DataSettings(train_csv=tmp_path / "train.csv", test_csv=tmp_path / "test.csv", output_dir=tmp_path / "out", **kw)


def test_stratified_sample_has_exact_size_and_every_class():
    data = frame({"a": 90, "b": 9, "c": 1})
    sample = stratified_sample(data, 20, seed=0)
    assert len(sample) == 20
    assert set(sample[LABEL]) == {"a", "b", "c"}
    assert (sample[LABEL] == "a").sum() > (sample[LABEL] == "b").sum()


def test_stratified_sample_is_deterministic_for_a_seed():
    data = frame({"a": 50, "b": 50})
    assert stratified_sample(data, 10, 1).equals(stratified_sample(data, 10, 1))


def test_stratified_sample_refuses_fewer_rows_than_classes():
    with pytest.raises(DataError, match="cannot cover 3 classes"):
        stratified_sample(frame({"a": 5, "b": 5, "c": 5}), 2, 0)


def test_build_sets_calibration_never_contains_an_evaluation_text(tmp_path):
    train = frame({"a": 30, "b": 30})
    test = train.iloc[[0, 1, 40]].copy()
    test.loc[test.index[0], TEXT] = "  A QUERY 0 "  # same text after normalisation
    calibration, evaluation = build_sets(train, test, settings(tmp_path, calibration_size=50))
    normalised = set(evaluation[TEXT].str.strip().str.lower())
    assert not set(calibration[TEXT].str.lower()) & normalised
    assert len(evaluation) == 3


def test_load_split_rejects_a_file_whose_hash_changed(tmp_path):
    path = tmp_path / "train.csv"
    frame({"a": 3}).to_csv(path, index=False)
    expected = sha256_of(path)
    path.write_text(path.read_text().replace("query 1", "query X"))
    with pytest.raises(DataError, match="sha256.*altered"):
        load_split(path, TEXT, LABEL, expected)


def test_load_split_names_missing_columns(tmp_path):
    path = tmp_path / "train.csv"
    frame({"a": 3}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no column\(s\) \['category'\].*label_column"):
        load_split(path, TEXT, "category", None)


def test_prepare_writes_both_sets_with_renamed_columns(tmp_path):
    frame({"a": 20, "b": 20}).rename(columns={TEXT: "utterance", LABEL: "intent"}).to_csv(tmp_path / "train.csv", index=False)
    frame({"a": 5, "b": 5}).assign(text=lambda f: f[TEXT] + " test").rename(
        columns={TEXT: "utterance", LABEL: "intent"}).to_csv(tmp_path / "test.csv", index=False)
    calibration_path, evaluation_path = prepare(settings(tmp_path, text_column="utterance", label_column="intent",
                                                         calibration_size=10))
    assert list(pd.read_csv(calibration_path).columns) == [TEXT, LABEL]
    assert len(pd.read_csv(calibration_path)) == 10 and len(pd.read_csv(evaluation_path)) == 10


def test_build_sets_refuses_a_calibration_size_larger_than_the_train_split(tmp_path):
    train, test = frame({"a": 10, "b": 10}), frame({"a": 3, "b": 3}).assign(text=lambda f: f[TEXT] + " test")
    with pytest.raises(DataError, match=r"calibration_size is 21 but .*train.csv gives only 20 rows.*at most 20"):
        build_sets(train, test, settings(tmp_path, calibration_size=21))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"text,label\n", "has a header but no rows"),
    ("text,label\ncaf\u00e9,a\n".encode("latin-1"), r"is not UTF-8 \(byte 0xe9 on line 2\).*iconv"),
    (b'text,label\n"a,b\n', "is not a well-formed CSV"),
])
def test_load_split_refuses_unreadable_files_naming_the_file(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as refused:
        load_split(path, TEXT, LABEL, None)
    assert str(refused.value).startswith(str(path))


@pytest.fixture
def dvc_project(tmp_path):
    from tests.conftest import banking77_slice, make_project

    train, test = banking77_slice(tmp_path / "data", intents=3, train_per_intent=20, test_per_intent=10)
    return make_project(tmp_path / "project", {"data": {
        "train_csv": str(train), "test_csv": str(test), "train_sha256": None, "test_sha256": None,
        "calibration_size": 30, "min_calibration_rows": 3, "min_eval_rows": 3}})


def _other_params(project, **data):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(data)
    (project / "other.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project / "other.yaml"


def test_reproduce_prepares_the_data_of_the_params_file_given_with_its_own_stage_and_lock(dvc_project):
    from tasks.data.version import reproduce

    default = reproduce(dvc_project, dvc_project / "data" / "prepared")
    main_lock = (dvc_project / "dvc.lock").read_text()
    other = reproduce(dvc_project, dvc_project / "data" / "prepared-other",
                      _other_params(dvc_project, calibration_size=12, output_dir="data/prepared-other"))
    assert len(pd.read_csv(dvc_project / "data" / "prepared-other" / CALIBRATION_FILE)) == 12
    assert len(pd.read_csv(default.calibration_path)) == 30
    assert other.version != default.version
    assert (dvc_project / "stages" / "other" / "dvc.lock").is_file()
    assert (dvc_project / "dvc.lock").read_text() == main_lock  # params.yaml's lock entry is untouched
    # Plain `dvc repro` still means params.yaml's stage, and nothing is out of date.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=dvc_project, capture_output=True, text=True)
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr


def test_reproduce_quotes_the_stage_error_and_keeps_no_stage_that_never_ran(dvc_project, tmp_path):
    from tasks.data.version import reproduce

    header_only = tmp_path / "header.csv"
    header_only.write_text("text,category\n")
    with pytest.raises(DataError, match=r"failed: .*header.csv has a header but no rows"):
        reproduce(dvc_project, dvc_project / "data" / "prepared-other",
                  _other_params(dvc_project, train_csv=str(header_only), output_dir="data/prepared-other"))
    assert not (dvc_project / "stages").exists()


def test_reproduce_refuses_a_params_file_writing_where_another_stage_writes(dvc_project):
    from tasks.data.version import reproduce

    with pytest.raises(DataError, match=r"data.output_dir data/prepared is where DVC stage 'dvc.yaml:prepare_data'"):
        reproduce(dvc_project, dvc_project / "data" / "prepared", _other_params(dvc_project, calibration_size=12))
    assert not (dvc_project / "stages").exists()


def test_stage_failure_prefers_the_stage_line_then_its_exception_then_dvc():
    from tasks.data.version import stage_failure

    dvc = "ERROR: failed to reproduce 'prepare_data': failed to run: python -m tasks.data.prepare, exited with 2"
    assert stage_failure(f"error: train.csv is empty: fix it\n{dvc}") == "train.csv is empty: fix it"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: No objects to concatenate\n"
    assert stage_failure(traceback + dvc) == "the stage raised ValueError: No objects to concatenate"
    assert stage_failure(dvc) == dvc.removeprefix("ERROR: ")
