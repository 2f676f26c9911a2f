"""Great Expectations suites for the calibration and evaluation sets.

A failed validation returns a result and does not raise (GX 1.x): `validate_prepared` checks
`.success` itself and raises with the failing expectations named, so the flow stops before
anything is quantized.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.config.settings import DataSettings
from tasks.core.errors import DataError
from tasks.data.prepare import LABEL, TEXT


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


def _file_context(docs_root: Path):
    """A GX file context under docs_root: it keeps the validation results and renders them as Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX resets its loggers on import and then warns about each docs folder it creates.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    docs_root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(docs_root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_suite(frame: pd.DataFrame, data_set: str, suite, context) -> ValidationReport:
    """Validate a DataFrame with a checkpoint that also updates the context's Data Docs."""
    import great_expectations as gx

    batch = (context.data_sources.add_or_update_pandas(data_set).add_dataframe_asset(data_set)
             .add_batch_definition_whole_dataframe(data_set))
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=data_set, data=batch, suite=suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=f"{data_set}-checkpoint", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")]))
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
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
                      settings: DataSettings, docs_dir: Path | None = None) -> list[ValidationReport]:
    """Validate both prepared sets against the model's classes; render GX Data Docs into docs_dir.

    Args:
        docs_dir: a fresh folder for the GX project whose Data Docs site (HTML) shows these
            validations; its `data_docs/` subfolder is the site. Default: a temporary folder.

    Raises:
        DataError: naming each failing expectation, if either set fails (the docs are written first).
    """
    import tempfile

    if docs_dir is None:
        docs_dir = Path(tempfile.mkdtemp(prefix="requant-gx-"))
    context = _file_context(Path(docs_dir))
    # Row-count bounds: below the minimum, static calibration and accuracy estimates break down;
    # above the configured sample size, the split went wrong.
    reports = [
        run_suite(calibration, "calibration", build_suite(
            "calibration", classes, settings, settings.min_calibration_rows, settings.calibration_size), context),
        run_suite(evaluation, "evaluation", build_suite(
            "evaluation", classes, settings, settings.min_eval_rows, settings.eval_size or 10_000_000), context),
    ]
    context.build_data_docs()
    overlap = set(calibration[TEXT]) & set(evaluation[TEXT])
    if overlap:
        reports[0].failures.append(f"calibration shares {len(overlap)} text(s) with evaluation, e.g. {sorted(overlap)[0]!r}")
    failed = [f"{r.data_set}: {f}" for r in reports for f in r.failures]
    if failed:
        raise DataError(f"data validation failed ({len(failed)}): " + "; ".join(failed) + " -- fix the data or params.yaml data section")
    return reports


def data_docs_site(docs_dir: Path) -> Path:
    """The Data Docs site (index.html and its pages) that `validate_prepared` rendered under docs_dir."""
    return Path(docs_dir) / "gx" / "uncommitted" / "data_docs" / "local_site"
