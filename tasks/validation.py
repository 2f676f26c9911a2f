"""Great Expectations suites for the calibration and evaluation sets.

A failed validation returns a result and does not raise (GX 1.x): `validate_prepared` checks
`.success` itself and raises with the failing expectations named, so the flow stops before
anything is quantized.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pandas as pd

from tasks.data_prep import LABEL, TEXT
from tasks.errors import DataError
from tasks.settings import DataSettings


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of one suite on one data set."""

    data_set: str
    success: bool
    evaluated: int
    failures: list[str]

    def as_dict(self) -> dict:
        """Plain dict for the MLflow artifact."""
        return {"data_set": self.data_set, "success": self.success, "evaluated": self.evaluated, "failures": self.failures}


def build_suite(name: str, classes: list[str], settings: DataSettings, min_rows: int, max_rows: int):
    """The expectations every prepared set must meet: schema, text, size, labels, class coverage."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx.ExpectationSuite(name=name, expectations=[
        gxe.ExpectTableColumnsToMatchSet(column_set=[TEXT, LABEL], exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column=TEXT),
        gxe.ExpectColumnValuesToNotBeNull(column=LABEL),
        gxe.ExpectColumnValueLengthsToBeBetween(column=TEXT, min_value=settings.min_text_chars, max_value=settings.max_text_chars),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, max_value=max_rows),
        gxe.ExpectColumnValuesToBeInSet(column=LABEL, value_set=classes),
        gxe.ExpectColumnDistinctValuesToContainSet(column=LABEL, value_set=classes),
    ])


def run_suite(frame: pd.DataFrame, data_set: str, suite) -> ValidationReport:
    """Validate a DataFrame in an ephemeral context (nothing persisted, safe to repeat)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX resets its loggers on import and then warns about each ephemeral docs folder it creates.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas(data_set).add_dataframe_asset(data_set)
             .add_batch_definition_whole_dataframe(data_set).get_batch(batch_parameters={"dataframe": frame}))
    result = batch.validate(suite)
    failures = []
    for item in result.results:
        if item.success:
            continue
        config, observed = item.expectation_config, item.result or {}
        seen = (observed.get("observed_value") or observed.get("partial_unexpected_list")
                or observed.get("partial_missing_list") or observed.get("details", ""))
        column = config.kwargs.get("column")
        failures.append(f"{config.type}{f'({column})' if column else ''}: observed {str(seen)[:80]}")
    return ValidationReport(data_set, bool(result.success), len(result.results), failures)


def validate_prepared(calibration: pd.DataFrame, evaluation: pd.DataFrame, classes: list[str],
                      settings: DataSettings) -> list[ValidationReport]:
    """Validate both prepared sets against the model's classes.

    Raises:
        DataError: naming each failing expectation, if either set fails.
    """
    # Row-count bounds: below the minimum, static calibration and accuracy estimates break down;
    # above the configured sample size, the split went wrong.
    reports = [
        run_suite(calibration, "calibration", build_suite(
            "calibration", classes, settings, settings.min_calibration_rows, settings.calibration_size)),
        run_suite(evaluation, "evaluation", build_suite(
            "evaluation", classes, settings, settings.min_eval_rows, settings.eval_size or 10_000_000)),
    ]
    overlap = set(calibration[TEXT]) & set(evaluation[TEXT])
    if overlap:
        reports[0].failures.append(f"calibration shares {len(overlap)} text(s) with evaluation, e.g. {sorted(overlap)[0]!r}")
    failed = [f"{r.data_set}: {f}" for r in reports for f in r.failures]
    if failed:
        raise DataError(f"data validation failed ({len(failed)}): " + "; ".join(failed) + " -- fix the data or params.yaml data section")
    return reports
