"""The requantize flow: data -> FP32 reference -> candidates built in parallel -> measured -> selected
-> recorded -> promoted. Its body is the list of its steps (flows/steps.py), in the card's order; a
causal language model takes the decoder path (flows/decoder_steps.py), the same card on text.

This module only wires: the work is in `tasks/`, the MLflow calls in `tasks.track`.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

from prefect import flow

from flows import decoder_steps, steps
from flows.run_state import RunSummary
from tasks.core import interrupts

__all__ = ["RunSummary", "requantize"]


@flow(name="requantize", log_prints=False)
def requantize(params_path: str = "params.yaml", model_uri: str | None = None, project_dir: str | None = None,
               force: bool = False, work_dir: str | None = None, fleet: list[str] | None = None) -> RunSummary:
    """Requantize a model version at every configured precision and promote the cheapest that meets the bar.

    Args:
        params_path: params.yaml to read.
        model_uri: model to requantize (models:/NAME/VERSION, models:/NAME@ALIAS or a folder);
            default: model.source_uri from params.yaml.
        project_dir: the DVC project holding dvc.yaml; default: the folder of params_path.
        force: decide again even if this (model, data, params) was already decided.
        work_dir: where exported graphs and candidates are built (content-addressed, reused
            across runs); default: PROJECT/models/work.
        fleet: profiles to price on, each measured by a worker of its work pool (overrides cost.fleet).
    """
    # Prefect installed its SIGTERM handler for this flow run: chain ours in front of it, so the
    # phase is recorded and the run ends KILLED with the reason (tasks/core/interrupts.py).
    interrupts.install()
    run = steps.open_run(params_path, model_uri, project_dir, force, work_dir, fleet)
    # The parent run opens before anything can fail, so every failure is a FAILED run with its reason.
    # `held` is entered first so that its locks are released only after the run is marked FINISHED.
    with ExitStack() as run.held, run.tracker.parent_run("requantize", steps.parent_run_tags(run)) as run.parent_id, \
            (run.tracker.system_metrics(run.parent_id) if run.settings.operations.system_metrics else nullcontext()):
        steps.close_stale_runs(run)
        steps.source_model(run)
        if run.family.task == "text-generation":  # a causal language model: judged on text, not labels
            return decoder_steps.requantize_decoder(run)
        steps.data(run)
        if earlier := steps.already_decided(run):
            return earlier
        steps.validate(run)
        steps.reference(run)
        steps.build(run)
        steps.measure(run)
        steps.search(run)
        steps.bring_back(run)
        steps.escalate(run)
        steps.time_passing(run)
        steps.select(run)
        steps.price_served(run)
        steps.confirm(run)
        steps.record_candidates(run)
        steps.record_decision(run)
        steps.promote(run)
    return run.summary()


if __name__ == "__main__":
    print(requantize().report)
