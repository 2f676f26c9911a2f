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
        model = open_model(Path(uri).expanduser().resolve(), settings.model.family, settings.model.max_length,
                           settings.model.allow_pickle_weights)
        check_data_for(model, settings)
    settings.cost.host_profile(cpu_info()["cpu_model"])
    files = ((settings.data.train_csv, settings.data.test_csv) if settings.data is not None else ()) + (
        (settings.text_data.calibration_txt, settings.text_data.evaluation_txt) if settings.text_data is not None else ())
    for path in files:
        require_file(path)
    # The tracking store answers (a server is probed once, with bounded retries) and knows the
    # model version. The flow runs in this process, so MLflow is imported once either way.
    tracker = Tracker(settings.registry)
    if registered:
        tracker.resolve_version(uri)


def check_data_for(model, settings: Settings) -> None:
    """Refuse a model given the other kind of data: a decoder needs `text_data`, a classifier `data`.

    Raises:
        DataError: the params file has no data of the kind the model is judged on.
    """
    from tasks.core.errors import DataError

    if model.task == "text-generation" and settings.text_data is None:
        architecture = ", ".join(getattr(model, "config", {}).get("architectures") or []) or "no architecture named"
        raise DataError(f"{model.folder} is a causal language model ({architecture}), but params.yaml gives no "
                        "`text_data` (held-out text to judge it on), only labelled `data`: add a text_data section "
                        "(see params-lm.yaml), or point model.source_uri at a classifier")
    if model.task != "text-generation" and settings.data is None:
        raise DataError(f"{model.folder} is a classifier, but params.yaml gives no labelled `data` (only `text_data`, "
                        "held-out text for a language model): add a data section, or point model.source_uri at a "
                        "causal language model")
