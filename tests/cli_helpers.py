"""Running the real `requant` command in tests, and what a clear refusal looks like."""

import subprocess
import sys
from pathlib import Path

import yaml


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


def params_for(project: Path, name: str, **sections) -> str:
    """The project's params with their own serving model and data folder (`name`), so each run stands alone.

    `sections` update params sections by key, e.g. `qat={"enabled": False}`. Another params file
    versions its data apart (its own DVC stage and output folder).
    """
    params = yaml.safe_load((Path(project) / "params.yaml").read_text())
    params["registry"]["serving_model_name"] = f"tiny-{name}-serving"
    params["data"]["output_dir"] = str(Path(project) / "data" / f"prepared-{name}")
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    path = Path(project) / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)
