"""Speed screening's statistics: which candidates, timed briefly first, are clearly slower than a rival.

The screen itself (timing the built candidates, bringing deferred ones back) is tasks/evaluate/speed.py.

Selection picks the most accurate candidate among those as fast as the fastest passing one within
noise (tasks/decide/selection.py); a candidate slower than a passing rival beyond the noise never wins,
whatever its accuracy. So before any full scoring every built candidate (production included) is
timed in a few short interleaved rounds (`evaluate.speed_screening`: 5 rounds x 1 batch of 32 by
default: one more round buys more than a second batch, since the bound's t quantile falls from 5.6 to
4.5), and a candidate clearly slower than some rival is *deferred*: not scored, not timed.
Deferred is not deleted: once the rivals are scored, a deferred candidate whose every faster rival
fails the quality bar is brought back and gets the full scoring and timing (`to_bring_back`);
so the screen can only change the winner by a false deferral, whose rate is stated below.

The test. Rounds are interleaved (each round times every candidate once, in a rotating order), so
a disturbance of the host hits both candidates of a pair in the same round and the per-round log
ratio d_r = log(rival's throughput / candidate's throughput) cancels it. Over R rounds, a one-sided
t lower confidence bound on the mean log ratio,

    LCB = mean(d) - t_{1-level, R-1} * sd(d) / sqrt(R),

must exceed log(1 + margin), and the rival must be faster in every round; then the candidate is
deferred against that rival. The default margin, 5%, is selection's own `speed_noise_margin`: a
candidate slower than a passing rival by more than that is never on the speed frontier. Null hypothesis: the rival is at most `margin`
faster (true mean log ratio <= log(1 + margin)); with per-round log ratios independent and normal
(interleaving removes the shared part), a deferral under it has probability <= level. The level is
alpha / (number of rivals) (Bonferroni over the rivals a candidate is compared with), so

    P(a candidate whose true speed is within `margin` of every rival is deferred) <= alpha

for each candidate; a near-tie (ratio within the margin) is never deferred by design, and a true tie
far less often than alpha. The production model and the FP32 baseline are never deferred (they are
always measured in full: every saving is priced against them); they are rivals like the others.

Worked example (10 candidates, 9 rivals, alpha 0.05, level 0.0056, R = 5, t = 4.47): FP32 at half
the throughput of per-channel INT8 (mean d = 0.69) with a round-to-round spread of 10% (sd 0.10)
has LCB = 0.69 - 4.47 * 0.045 = 0.49 > log 1.05 = 0.049: deferred. A candidate 20% slower (d = 0.18)
with the same spread has LCB = -0.02: measured in full.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from scipy import stats

log = logging.getLogger("requant")

TEST = ("one-sided paired t lower bound on the mean per-round log throughput ratio (interleaved rounds), must exceed "
        "log(1 + margin) with the rival faster in every round; level alpha / rivals (Bonferroni) per candidate")


@dataclass(frozen=True)
class Beaten:
    """A rival that is faster than the candidate beyond noise, and by how much."""

    rival: str
    ratio_low: float  # lower confidence bound on rival / candidate throughput
    ratio: float  # geometric mean of the per-round ratios


@dataclass
class SpeedScreenOutcome:
    """A deferred candidate: who beat it, the bounds, and whether it was brought back."""

    deferred: bool
    rounds: int
    level: float
    margin: float
    beaten_by: list[Beaten] = field(default_factory=list)
    brought_back: bool = False
    brought_back_because: str = ""

    @property
    def reason(self) -> str:
        """One line for the table, the MLflow run and decision.json."""
        best = max(self.beaten_by, key=lambda b: b.ratio_low)
        return (f"deferred by the speed screen: {best.rival} is {best.ratio:.2f}x as fast (lower bound "
                f"{best.ratio_low:.2f}x > {1 + self.margin:.2f}x over {self.rounds} interleaved rounds, level "
                f"{self.level:.3g}), and a faster rival passes the bar")

    def as_dict(self) -> dict:
        """Plain dict for decision.json."""
        return {**asdict(self), "reason": self.reason}


def log_ratio_lower_bound(rival_rates: list[float], candidate_rates: list[float], level: float) -> tuple[float, float]:
    """(mean, one-sided lower confidence bound at `level`) of log(rival / candidate) over paired rounds."""
    d = np.log(np.asarray(rival_rates, float)) - np.log(np.asarray(candidate_rates, float))
    mean = float(d.mean())
    if len(d) < 2:
        return mean, -math.inf
    spread = float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - _t_quantile(1 - level, len(d) - 1) * spread


@lru_cache(maxsize=64)
def _t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


def defer_slower(rates: dict[str, list[float]], alpha: float, margin: float,
                 protected: set[str] = frozenset()) -> dict[str, SpeedScreenOutcome]:
    """Which candidates are clearly slower than some rival, from per-round throughputs of interleaved rounds.

    Args:
        rates: candidate -> throughput per round (every list the same rounds, in the same order).
        alpha: per candidate, the most probability of deferring it when no rival is more than
            `margin` faster.
        margin: relative speed advantage a rival must clear (0.05: more than 5% faster).
        protected: candidates never deferred (the production model); they are still rivals.

    Returns:
        candidate -> outcome, for the deferred candidates only.
    """
    names = [n for n, r in rates.items() if len(r) >= 2 and all(x > 0 and math.isfinite(x) for x in r)]
    rivals = len(names) - 1
    if rivals < 1:
        return {}
    level = alpha / rivals
    threshold = math.log1p(margin)
    outcomes: dict[str, SpeedScreenOutcome] = {}
    for name in names:
        if name in protected:
            continue
        beaten = []
        for rival in names:
            if rival == name:
                continue
            mean, low = log_ratio_lower_bound(rates[rival], rates[name], level)
            every_round = all(r > c for r, c in zip(rates[rival], rates[name]))
            if every_round and low > threshold:
                beaten.append(Beaten(rival, math.exp(low), math.exp(mean)))
        if beaten:
            outcomes[name] = SpeedScreenOutcome(True, len(rates[name]), level, margin, beaten)
    return outcomes


def to_bring_back(deferred: dict[str, SpeedScreenOutcome], passed: dict[str, bool]) -> list[str]:
    """Deferred candidates to measure after all: every rival that beat them was measured and fails the bar.

    Args:
        deferred: candidate -> its outcome, for candidates still deferred.
        passed: candidate -> whether it passes the quality bar, for candidates fully measured.

    A rival that is itself still deferred keeps the candidate deferred for now: the rival comes back
    first if its own rivals fail (the "faster beyond noise" relation has no cycles: it orders
    candidates by mean log throughput), and the candidate is looked at again after it.
    """
    return [name for name, outcome in deferred.items()
            if all(b.rival in passed and not passed[b.rival] for b in outcome.beaten_by)]
