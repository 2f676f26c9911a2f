"""What `requant run` checks before the flow starts: cheap, and refused in one line.

The flow makes each of these checks again where it uses the input (a scheduled or triggered run
never passes through the CLI); checking them first only spares a user the seconds a Prefect
server takes to start before being told that a path, a model version or a server is wrong.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config.settings import Settings


def check_run_inputs(settings: Settings, model_uri: str | None) -> None:
    """Refuse a run whose model, hardware profile or data files are wrong, before it starts.

    Args:
        settings: the validated params file.
        model_uri: `--model`, or None for model.source_uri.

    Raises:
        RequantError: a malformed model URI, a local model folder that is not one, no hardware
            profile for this CPU, a data file that does not exist, a tracking store that cannot
            be used, or a model, alias or version the registry does not have.
    """
    from tasks.data.prepare import require_file
    from tasks.measure.timing import cpu_info
    from tasks.models.base import open_model
    from tasks.track import Tracker, parse_model_uri

    uri = model_uri or settings.model.source_uri
    registered = parse_model_uri(uri) is not None
    if not registered:
        # A local model folder of any family: missing, pickles, remote code, wrong head, no tokenizer.
        open_model(Path(uri).expanduser().resolve(), settings.model.family, settings.model.max_length,
                   settings.model.allow_pickle_weights)
    settings.cost.host_profile(cpu_info()["cpu_model"])
    for path in (settings.data.train_csv, settings.data.test_csv):
        require_file(path)
    # The tracking store answers (a server is probed once, with bounded retries) and knows the
    # model version. The flow runs in this process, so MLflow is imported once either way.
    tracker = Tracker(settings.registry)
    if registered:
        tracker.resolve_version(uri)
