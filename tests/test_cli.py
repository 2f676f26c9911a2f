"""The `requant` command's listings. Bad input through the real command: tests/test_bad_inputs.py."""

import subprocess
import sys


def test_cli_lists_recipes():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "recipes"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "int8-static (int8)" in done.stdout and "calibration_method" in done.stdout
