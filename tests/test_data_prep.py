import pandas as pd
import pytest

from tasks.data_prep import (
    LABEL,
    TEXT,
    build_sets,
    load_split,
    prepare,
    sha256_of,
    stratified_sample,
)
from tasks.errors import DataError
from tasks.settings import DataSettings


def frame(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label} query {i}", label) for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=[TEXT, LABEL])


def settings(tmp_path, **kw) -> DataSettings:
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
