"""Build the calibration and evaluation sets from a labelled train/test CSV pair.

This is the `prepare_data` stage in dvc.yaml (`python -m tasks.data.prepare`). Its outputs are
deterministic for a given input and params, so `dvc repro` on a fresh clone reproduces the hashes
recorded in dvc.lock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config.loading import load_settings
from tasks.config.settings import DataSettings
from tasks.core.errors import DataError, RequantError
from tasks.core.hashing import sha256_of

# Prepared files always use these column names, whatever the source calls them.
TEXT = "text"
LABEL = "label"
CALIBRATION_FILE = "calibration.csv"
EVALUATION_FILE = "evaluation.csv"


def require_file(path: Path) -> None:
    """Raise a one-line DataError unless `path` is an existing file."""
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "not found"
        raise DataError(
            f"data file {path} {what}: set data.train_csv/test_csv in params.yaml "
            "to your copy (see README, 'Data')"
        )


def load_split(path: Path, text_column: str, label_column: str, expected_sha256: str | None) -> pd.DataFrame:
    """Read one split, check its hash, and return it with columns `text` and `label`.

    Raises:
        DataError: the file is missing, unreadable, empty, not UTF-8 or not a CSV, has no rows, its
            hash differs from params.yaml, or a column is absent.
    """
    require_file(path)
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise DataError(
                f"data file {path} has sha256 {actual[:12]}..., expected {expected_sha256[:12]}...: "
                "the file is altered or a different version; restore the original or update the hash in params.yaml"
            )
    frame = _read_csv(path)
    missing = [c for c in (text_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} has no column(s) {missing} (columns: {list(frame.columns)}): "
            "set data.text_column/label_column in params.yaml"
        )
    if frame.empty:
        raise DataError(f"{path} has a header but no rows: point data.train_csv/test_csv in params.yaml at a file with labelled rows")
    return frame[[text_column, label_column]].rename(columns={text_column: TEXT, label_column: LABEL})


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV as strings, turning pandas' and the codec's exceptions into one-line DataErrors."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 ({_first_bad_byte(path)}): "
                        "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty: it needs a header line and labelled rows (see README, 'Data')") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} is not a well-formed CSV ({str(exc).strip().splitlines()[-1]}): fix the file or quote its fields") from exc
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}): check its permissions") from exc


def _first_bad_byte(path: Path) -> str:
    # pandas reports offsets within its read buffer; decode the file again to name the line.
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte {data[exc.start]:#04x} on line {line}"
    return "an invalid byte"


def stratified_sample(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """Draw `size` rows with every class present and classes in proportion to their frequency.

    Quotas use largest remainders on top of one row per class, so the total is exact.
    """
    counts = frame[LABEL].value_counts().sort_index()
    if size < len(counts):
        raise DataError(
            f"a sample of {size} rows cannot cover {len(counts)} classes: raise data.calibration_size/eval_size in params.yaml"
        )
    size = min(size, len(frame))
    spare = size - len(counts)
    share = (counts - 1).clip(lower=0)
    exact = share / max(share.sum(), 1) * spare
    quota = np.floor(exact).astype(int)
    remainder_order = (exact - quota).sort_values(ascending=False, kind="stable").index
    for label in remainder_order[: spare - int(quota.sum())]:
        quota[label] += 1
    quota = (quota + 1).clip(upper=counts)
    rng = np.random.default_rng(seed)
    picked = []
    for label, n in quota.items():
        rows = frame[frame[LABEL] == label]
        picked.append(rows.iloc[np.sort(rng.choice(len(rows), size=int(n), replace=False))])
    return pd.concat(picked).sort_values([LABEL, TEXT], kind="stable").reset_index(drop=True)


def _normalised(texts: pd.Series) -> pd.Series:
    return texts.str.strip().str.lower().str.split().str.join(" ")


def build_sets(train: pd.DataFrame, test: pd.DataFrame, settings: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (calibration, evaluation).

    Evaluation is the test split (or a stratified cap of it). Calibration is a stratified sample of
    the train split from which every text also in the evaluation set was removed, so calibration
    never sees an evaluated example.
    """
    evaluation = test if settings.eval_size is None else stratified_sample(test, settings.eval_size, settings.seed)
    evaluation = evaluation.reset_index(drop=True)
    leaked = _normalised(train[TEXT]).isin(set(_normalised(evaluation[TEXT])))
    usable = int((~leaked).sum())
    # Asking for more calibration rows than exist must not quietly calibrate on fewer.
    if settings.calibration_size > usable:
        raise DataError(
            f"data.calibration_size is {settings.calibration_size} but {settings.train_csv} gives only {usable} rows "
            f"for calibration{f' ({int(leaked.sum())} more share their text with the evaluation set)' if leaked.any() else ''}: "
            f"lower data.calibration_size to at most {usable} in params.yaml or add training rows"
        )
    calibration = stratified_sample(train[~leaked], settings.calibration_size, settings.seed)
    return calibration, evaluation


def prepare(settings: DataSettings) -> tuple[Path, Path]:
    """Read, check, split and write the prepared CSVs; return their paths."""
    train = load_split(settings.train_csv, settings.text_column, settings.label_column, settings.train_sha256)
    test = load_split(settings.test_csv, settings.text_column, settings.label_column, settings.test_sha256)
    calibration, evaluation = build_sets(train, test, settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    calibration_path = settings.output_dir / CALIBRATION_FILE
    evaluation_path = settings.output_dir / EVALUATION_FILE
    calibration.to_csv(calibration_path, index=False)
    evaluation.to_csv(evaluation_path, index=False)
    return calibration_path, evaluation_path


def main(argv: list[str] | None = None) -> int:
    """Entry point of the DVC stage."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params.yaml to read (section 'data').")
    args = parser.parse_args(argv)
    try:
        calibration_path, evaluation_path = prepare(load_settings(args.params).data)
    except RequantError as exc:
        # One line, which `requant run` quotes as the reason the DVC stage failed.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {calibration_path} and {evaluation_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
