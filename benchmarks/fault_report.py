"""Run the fault suite (and the bad-input suite, where present) and print what they found.

    python benchmarks/fault_report.py            # tests/test_faults.py + tests/test_bad_input*.py
    python benchmarks/fault_report.py -- -k stop # extra pytest arguments after --

Prints: inputs tried and refused cleanly, faults injected and survived, wrong promotions (must be
0), lost results (must be 0), and each fault's outcome. Exits non-zero if pytest failed or either
count that must be 0 is not. The tests record these figures in tests/fault_ledger.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    suites = [str(p.relative_to(REPO)) for p in [REPO / "tests" / "test_faults.py", *sorted((REPO / "tests").glob("test_bad_input*.py"))]]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "REQUANT_FAULT_REPORT": str(report), "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites, *extra],
                              cwd=REPO, env=env)
        seconds = time.perf_counter() - start
        if not report.is_file():
            print(f"no figures recorded (pytest exit {done.returncode})")
            return done.returncode or 1
        figures = json.loads(report.read_text())
    print()
    print(f"suites: {', '.join(suites)} ({seconds:.0f} s, pytest exit {done.returncode})")
    print(f"bad inputs tried:        {figures['inputs_tried']:3d}   refused cleanly: {figures['inputs_refused_cleanly']}")
    print(f"faults injected:         {figures['faults_injected']:3d}   survived: {figures['faults_survived']}"
          f"   waiting on fixes from main: {figures['faults_waiting_on_main']}")
    print(f"wrong promotions:        {figures['wrong_promotions']:3d}   (must be 0)")
    print(f"lost results:            {figures['lost_results']:3d}   (must be 0)")
    for fault in figures["faults"]:
        waiting = f"   waiting on: {', '.join(fault['waiting_on'])}" if fault["waiting_on"] else ""
        print(f"  {'ok ' if fault['survived'] else 'NO '} {fault['name']}{waiting}")
    bad = figures["wrong_promotions"] or figures["lost_results"]
    return done.returncode or (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
