import pandas as pd
import pytest

from tasks.config.settings import DataSettings
from tasks.core.errors import DataError
from tasks.data.prepare import LABEL, TEXT
from tasks.data.validate import validate_prepared

CLASSES = ["card_lost", "refund", "top_up"]
SETTINGS = DataSettings(train_csv="x", test_csv="y", calibration_size=30, min_calibration_rows=6, min_eval_rows=6,
                        max_text_chars=200)


def rows(prefix: str, per_class: int) -> pd.DataFrame:
    return pd.DataFrame([(f"{prefix} {label} question {i}", label) for label in CLASSES for i in range(per_class)],
                        columns=[TEXT, LABEL])


def test_validate_prepared_passes_good_data():
    reports = validate_prepared(rows("cal", 3), rows("eval", 3), CLASSES, SETTINGS)
    assert all(r.success for r in reports) and reports[0].evaluated == 7


@pytest.mark.parametrize("break_it, expectation", [
    (lambda cal: cal.iloc[:1], "expect_table_row_count_to_be_between"),          # 1-sample calibration
    (lambda cal: cal[cal[LABEL] != "refund"], "expect_column_distinct_values_to_contain_set"),
    (lambda cal: cal.assign(label=cal[LABEL].replace("refund", "refnud")), "expect_column_values_to_be_in_set"),
    (lambda cal: cal.assign(text=cal[TEXT].where(cal.index != 0, "")), "expect_column_value_lengths_to_be_between"),
    (lambda cal: cal.assign(extra=1), "expect_table_columns_to_match_set"),
])
def test_validate_prepared_names_the_failing_expectation(break_it, expectation):
    with pytest.raises(DataError, match=f"calibration: {expectation}"):
        validate_prepared(break_it(rows("cal", 3)), rows("eval", 3), CLASSES, SETTINGS)


def test_validate_prepared_catches_calibration_leaking_into_evaluation():
    evaluation = rows("cal", 3)
    with pytest.raises(DataError, match="shares 9 text"):
        validate_prepared(rows("cal", 3), evaluation, CLASSES, SETTINGS)


def test_validate_prepared_renders_data_docs_for_both_sets(tmp_path):
    validate_prepared(rows("cal", 3), rows("eval", 3), CLASSES, SETTINGS, docs_dir=tmp_path / "gx")
    site = tmp_path / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site"
    index = (site / "index.html").read_text()
    assert "calibration" in index and "evaluation" in index
    assert len(list((site / "validations").rglob("*.html"))) == 2  # one page per validated set
