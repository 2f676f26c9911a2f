"""Running the real `requant` command in tests, and what a clear refusal looks like."""

import subprocess
import sys


def requant(*args, cwd=None, timeout=300):
    """Run `python -m flows.cli ARGS`; return the finished process and its `error:` lines."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return done, errors


def assert_one_clear_error(done, errors, *fragments):
    """Exit 2, exactly one `error:` line holding every fragment, and no traceback."""
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in errors[0]
