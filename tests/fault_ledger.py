"""What the fault and bad-input suites tried, for the summary printed at the end of a pytest session.

Tests record here; `tests/conftest.py` prints the summary (and writes it as JSON to
$REQUANT_FAULT_REPORT when set, which `benchmarks/fault_report.py` reads):

    fault_ledger.record_input("calibration_size larger than the train set", refused_cleanly=True)
    fault_ledger.record_fault("SIGKILL during quantize", survived=True)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FaultOutcome:
    """One injected fault and what the checks after it found."""

    name: str
    survived: bool
    wrong_promotions: int = 0
    lost_results: int = 0
    # Checks that failed only because they need a fix not merged into this branch yet.
    waiting_on: list[str] = field(default_factory=list)


@dataclass
class InputOutcome:
    """One bad input given to the CLI, and whether it was refused cleanly (one line, exit 2, no traceback)."""

    name: str
    refused_cleanly: bool


FAULTS: list[FaultOutcome] = []
INPUTS: list[InputOutcome] = []


def record_fault(name: str, survived: bool, wrong_promotions: int = 0, lost_results: int = 0,
                 waiting_on: list[str] | None = None) -> None:
    """Record one injected fault."""
    FAULTS.append(FaultOutcome(name, survived, wrong_promotions, lost_results, list(waiting_on or [])))


def record_input(name: str, refused_cleanly: bool) -> None:
    """Record one bad input."""
    INPUTS.append(InputOutcome(name, refused_cleanly))


def summary() -> dict:
    """The figures: inputs tried and refused cleanly, faults injected and survived, wrong promotions, lost results."""
    return {
        "inputs_tried": len(INPUTS), "inputs_refused_cleanly": sum(i.refused_cleanly for i in INPUTS),
        "faults_injected": len(FAULTS), "faults_survived": sum(f.survived for f in FAULTS),
        "faults_waiting_on_main": sum(bool(f.waiting_on) for f in FAULTS),
        "wrong_promotions": sum(f.wrong_promotions for f in FAULTS),
        "lost_results": sum(f.lost_results for f in FAULTS),
        "faults": [asdict(f) for f in FAULTS], "inputs": [asdict(i) for i in INPUTS],
    }


def summary_lines() -> list[str]:
    """The summary as text lines (empty when nothing was recorded)."""
    if not FAULTS and not INPUTS:
        return []
    s = summary()
    lines = [f"bad inputs: {s['inputs_tried']} tried, {s['inputs_refused_cleanly']} refused cleanly",
             f"faults: {s['faults_injected']} injected, {s['faults_survived']} survived"
             + (f" ({s['faults_waiting_on_main']} with checks waiting on fixes from main)" if s["faults_waiting_on_main"] else ""),
             f"wrong promotions: {s['wrong_promotions']} (must be 0)",
             f"lost results: {s['lost_results']} (must be 0)"]
    for fault in FAULTS:
        state = "survived" if fault.survived else "NOT SURVIVED"
        waiting = f"; waiting on: {', '.join(fault.waiting_on)}" if fault.waiting_on else ""
        lines.append(f"  {fault.name}: {state}{waiting}")
    for item in INPUTS:
        if not item.refused_cleanly:
            lines.append(f"  input not refused cleanly: {item.name}")
    return lines


def write_json_if_asked() -> None:
    """Write the summary to $REQUANT_FAULT_REPORT, if set."""
    target = os.environ.get("REQUANT_FAULT_REPORT")
    if target and (FAULTS or INPUTS):
        Path(target).write_text(json.dumps(summary(), indent=2))
