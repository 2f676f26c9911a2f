"""Shadow comparison of a challenger against production, and the rule that lets it replace production.

`replay` sends the same texts through both models, alternating which goes first per batch (so a
warm cache or a noisy neighbour does not favour one), and measures agreement, per-call latency
and, where the sample has labels, accuracy. `judge_rollout` is the pure rule. The MLflow side
(loading the versions, the recorded run, the alias flip) is in flows/after_decision.py via tasks.track.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.core.errors import RequantError

Predict = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class TrafficSample:
    """Texts to replay, with their labels when the sample has them."""

    source: str
    texts: list[str]
    labels: list[str] | None


@dataclass(frozen=True)
class ShadowResult:
    """What the replay measured."""

    rows: int
    agreement: float  # share of texts on which the challenger gave production's label
    production_accuracy: float | None
    challenger_accuracy: float | None
    relative_accuracy_loss: float | None  # (production - challenger) / production; negative = challenger better
    production_latency_p50_ms: float
    production_latency_p95_ms: float
    challenger_latency_p50_ms: float
    challenger_latency_p95_ms: float
    batch_size: int

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow (None values left out)."""
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RolloutVerdict:
    """Whether the challenger replaces production, and why."""

    flip: bool
    reason: str


def read_traffic(path: Path, text_columns: Sequence[str], label_columns: Sequence[str], max_rows: int) -> TrafficSample:
    """Read a traffic sample: a CSV with a text column and, optionally, a label column.

    The first of `text_columns` (and of `label_columns`) the file has is used. At most `max_rows`
    rows are kept, taken evenly across the file so a sorted file is not cut to one end.

    Raises:
        RequantError: the file is missing or unreadable, has no text column, or no text.
    """
    path = Path(path)
    if not path.is_file():
        raise RequantError(f"traffic sample {path} not found: pass --sample CSV (a text column, optionally a label column), "
                           "or run `requant run` first to prepare the evaluation set")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RequantError(f"traffic sample {path} is not a readable CSV ({str(exc).splitlines()[0]}): fix the file") from exc
    text = next((c for c in text_columns if c in frame.columns), None)
    if text is None:
        raise RequantError(f"traffic sample {path} has no text column (looked for {', '.join(text_columns)}; it has "
                           f"{', '.join(map(str, frame.columns)) or 'none'}): pass --text-column")
    label = next((c for c in label_columns if c in frame.columns), None)
    frame = frame[frame[text].str.strip() != ""]
    if frame.empty:
        raise RequantError(f"traffic sample {path} holds no text in column '{text}': give it some rows")
    if len(frame) > max_rows:
        frame = frame.iloc[np.linspace(0, len(frame) - 1, max_rows).round().astype(int)]
    return TrafficSample(source=str(path), texts=frame[text].tolist(),
                         labels=frame[label].tolist() if label is not None else None)


def replay(production: Predict, challenger: Predict, sample: TrafficSample, batch_size: int) -> ShadowResult:
    """Send every text of `sample` through both models, `batch_size` texts per call, and compare.

    Latency is per call (one batch), in milliseconds.
    """
    predictions: dict[str, list[str]] = {"production": [], "challenger": []}
    latencies: dict[str, list[float]] = {"production": [], "challenger": []}
    models = {"production": production, "challenger": challenger}
    for index, start in enumerate(range(0, len(sample.texts), batch_size)):
        batch = sample.texts[start:start + batch_size]
        order = ("production", "challenger") if index % 2 == 0 else ("challenger", "production")
        for name in order:
            began = time.perf_counter()
            labels = list(models[name](batch))
            latencies[name].append((time.perf_counter() - began) * 1000)
            if len(labels) != len(batch):
                raise RequantError(f"the {name} model answered {len(labels)} labels for {len(batch)} texts: "
                                   "it is not a requant serving model")
            predictions[name] += [str(label) for label in labels]
    produced, challenged = np.array(predictions["production"]), np.array(predictions["challenger"])
    accuracy = {name: None for name in models}
    loss = None
    if sample.labels is not None:
        truth = np.array(sample.labels)
        accuracy = {name: float((np.array(predictions[name]) == truth).mean()) for name in models}
        base = accuracy["production"]
        # Fail closed, as selection does: against a production that scores nothing, any loss is unbounded.
        loss = (base - accuracy["challenger"]) / base if base > 0 else (0.0 if accuracy["challenger"] >= base else np.inf)
    return ShadowResult(
        rows=len(sample.texts), agreement=float((produced == challenged).mean()),
        production_accuracy=accuracy["production"], challenger_accuracy=accuracy["challenger"],
        relative_accuracy_loss=None if loss is None else float(loss),
        production_latency_p50_ms=float(np.percentile(latencies["production"], 50)),
        production_latency_p95_ms=float(np.percentile(latencies["production"], 95)),
        challenger_latency_p50_ms=float(np.percentile(latencies["challenger"], 50)),
        challenger_latency_p95_ms=float(np.percentile(latencies["challenger"], 95)),
        batch_size=batch_size)


def judge_rollout(result: ShadowResult, min_agreement: float, max_relative_accuracy_loss: float) -> RolloutVerdict:
    """The challenger replaces production only if it agrees with production on at least
    `min_agreement` of the texts and, where labels exist, loses at most `max_relative_accuracy_loss`
    of production's accuracy (relative). Latency is recorded, not judged: `requant loadtest` does that.
    """
    if result.agreement < min_agreement:
        return RolloutVerdict(False, f"agreement {result.agreement:.2%} with production is below rollout.min_agreement "
                                     f"{min_agreement:.2%} on {result.rows} texts")
    if result.relative_accuracy_loss is not None and result.relative_accuracy_loss > max_relative_accuracy_loss:
        return RolloutVerdict(False, f"accuracy {result.challenger_accuracy:.2%} vs production {result.production_accuracy:.2%}: "
                                     f"a relative loss of {result.relative_accuracy_loss:.2%}, above "
                                     f"quality_bar.max_relative_accuracy_loss {max_relative_accuracy_loss:.2%}")
    accuracy = ("" if result.relative_accuracy_loss is None else
                f", accuracy {result.challenger_accuracy:.2%} vs production {result.production_accuracy:.2%}")
    return RolloutVerdict(True, f"agreement {result.agreement:.2%} >= {min_agreement:.2%} on {result.rows} texts{accuracy}")
