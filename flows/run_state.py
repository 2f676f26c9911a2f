"""What one requantize run knows as it goes: the typed state its steps read and fill in, the clock
that times its phases, and the summary it returns."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.build.candidates import BuiltCandidate
from tasks.build.reference import Reference
from tasks.config.settings import HardwareProfile, Settings
from tasks.core import interrupts
from tasks.data.version import DataVersion
from tasks.decide.selection import Decision
from tasks.evaluate.candidates import MeasuredCandidate
from tasks.evaluate.speed import SpeedScreen
from tasks.measure.result_cache import ResultCache
from tasks.measure.served_pricing import ServedCapacity
from tasks.track import ProductionBroken, ProductionVersion, SourceModel, Tracker
from tasks.train.qat import Escalation

log = logging.getLogger("requant")


@dataclass
class RunSummary:
    """What a requantize run did, for the CLI, the benchmark script and tests."""

    outcome: str  # promoted | kept-production | no-candidate-passed | not-confirmed | already-decided
    decision_key: str
    parent_run_id: str | None = None
    winner: str | None = None
    promoted_version: str | None = None
    table: str = ""
    report: str = ""  # the table, then the decision and why each other candidate lost
    decision: dict = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None  # the Prefect flow run (its artifacts hold the decision table)


class PhaseClock:
    """Wall time per phase, so later work can see where a run spends it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        interrupts.enter_phase(name)  # stops here if a signal came and its first raise was swallowed
        log.info("%s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RunState:
    """One run's inputs and everything its steps have found so far, in the order they find it."""

    # Given (flows/steps.py: open_run)
    settings: Settings
    params_path: Path
    project: Path
    work_dir: Path
    model_uri: str | None
    force: bool
    tracker: Tracker
    host: dict[str, str]
    profile: HardwareProfile
    clock: PhaseClock = field(default_factory=PhaseClock)
    started: float = field(default_factory=time.perf_counter)
    held: ExitStack | None = None  # locks released only after the parent run is marked FINISHED
    parent_id: str = ""
    # source_model and data
    source: SourceModel | None = None
    family: Any = None  # the model family (tasks.models.base.ModelFamily)
    data: DataVersion | None = None
    calibration: pd.DataFrame | None = None
    evaluation: pd.DataFrame | None = None
    key: str = ""  # the decision key (flows/steps.py: decision_key)
    # reference and build
    reference: Reference | None = None
    built: list[BuiltCandidate] = field(default_factory=list)
    # measure, search, escalate, time
    production: ProductionVersion | None = None
    production_broken: ProductionBroken | None = None
    scores: ResultCache | None = None
    speed: SpeedScreen | None = None
    measured: list[MeasuredCandidate] = field(default_factory=list)
    search_record: dict | None = None
    escalation: Escalation | None = None
    # select, price, confirm
    decision: Decision | None = None
    served: dict[str, ServedCapacity] = field(default_factory=dict)
    # cost.fleet (flows/fleet_steps.py): every profile's figures and the chosen pair, the report's part, the artifact's rows
    fleet: dict | None = None
    fleet_outcomes: list = field(default_factory=list)  # tasks.fleet.choice.ProfileOutcome
    fleet_choice: Any = None  # tasks.fleet.choice.FleetChoice
    fleet_report: str = ""
    fleet_rows: list[dict] = field(default_factory=list)
    winner: MeasuredCandidate | None = None
    confirmation: dict | None = None
    outcome: str = ""
    # the decoder path (flows/decoder_steps.py): its reference, candidates and decision
    decoder_reference: Any = None  # tasks.build.decoder_reference.DecoderReference
    decoders: list = field(default_factory=list)  # tasks.evaluate.decoders.DecoderCandidate
    decoder_decision: Any = None  # tasks.decide.decoder_selection.DecoderDecision
    text_hashes: dict[str, str] = field(default_factory=dict)  # sha256 of the held-out text files
    # record and promote
    model_uris: dict[str, str] = field(default_factory=dict)
    promoted_version: str | None = None
    table: str = ""
    report: str = ""
    decided: dict = field(default_factory=dict)

    def summary(self) -> RunSummary:
        """The run's summary, once it has decided (or found the decision already made)."""
        from prefect.runtime import flow_run

        decision = self.decision or self.decoder_decision
        return RunSummary(outcome=self.outcome, decision_key=self.key, parent_run_id=self.parent_id,
                          winner=decision.winner if decision else None,
                          promoted_version=self.promoted_version, table=self.table, report=self.report,
                          decision=self.decided, phases=self.clock.seconds,
                          flow_run_id=str(flow_run.id) if flow_run.id else None)
