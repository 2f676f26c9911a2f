"""Give requant its own MLflow user with only the permissions it needs (run once per stack, as admin).

Used by `infra/stack.sh up` and by the compose stack's `mlflow-setup` service:

    python infra/mlflow_access.py --params params.yaml        # URL and credentials from the environment

What requant does on the server, and the grant that allows it (nothing else is granted; the
server's `default_permission = READ` lets it read the rest):
- create runs, log params/metrics/artifacts and tags in its experiment: EDIT on the experiment;
- register versions of the source model (`requant train`) and set its alias: EDIT on that model;
- register versions of the serving model and move `@production`: EDIT on the serving model.
The experiment and both registered models are created here, by the admin, so requant never needs
the right to create or delete anything. Webhooks are admin-only in MLflow: `register_webhook`
creates them with the admin's credentials, and requant's user cannot change them.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

USER_ENV = ("REQUANT_MLFLOW_USERNAME", "REQUANT_MLFLOW_PASSWORD")
ADMIN_ENV = ("MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD")
PERMISSION = "EDIT"


class AccessError(RuntimeError):
    """The server refused a set-up call; the message holds its answer."""


def _call(client: httpx.Client, method: str, path: str, ok_codes: tuple[str, ...] = (), **kwargs) -> dict:
    response = client.request(method, path, **kwargs)
    if response.status_code == 200:
        return response.json() if response.content else {}
    try:
        code = response.json().get("error_code", "")
    except ValueError:
        code = ""
    if code in ok_codes:
        return {}
    raise AccessError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:300]}")


def grant_requant_access(url: str, admin: tuple[str, str], user: tuple[str, str], experiment: str,
                         models: list[str]) -> dict[str, str]:
    """Create the requant user, its experiment and registered models, and grant EDIT on exactly those.

    Idempotent: an existing user gets its password reset to `user[1]`; existing resources are kept.

    Returns:
        {"experiment_id": ...} of the experiment the grants cover.

    Raises:
        AccessError: the server refused a call (wrong admin password, auth not enabled, ...).
    """
    with httpx.Client(base_url=url, auth=admin, timeout=30) as client:
        created = _call(client, "POST", "/api/2.0/mlflow/users/create", ("RESOURCE_ALREADY_EXISTS",),
                        json={"username": user[0], "password": user[1]})
        if not created:
            _call(client, "PATCH", "/api/2.0/mlflow/users/update-password",
                  json={"username": user[0], "password": user[1]})
        found = client.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment})
        if found.status_code == 200:
            experiment_id = found.json()["experiment"]["experiment_id"]
        else:
            # No artifact location: the server's proxied store (S3 behind --artifacts-destination).
            experiment_id = _call(client, "POST", "/api/2.0/mlflow/experiments/create", json={"name": experiment})["experiment_id"]
        grants = [("experiment", experiment_id)]
        for name in models:
            _call(client, "POST", "/api/2.0/mlflow/registered-models/create", ("RESOURCE_ALREADY_EXISTS",), json={"name": name})
            grants.append(("registered_model", name))
        for resource_type, resource_id in grants:
            _call(client, "POST", "/api/3.0/mlflow/users/permissions/grant",
                  json={"username": user[0], "resource_type": resource_type, "resource_id": resource_id,
                        "permission": PERMISSION})
    return {"experiment_id": experiment_id}


def names_from_params(params_path: str) -> tuple[str, list[str]]:
    """The experiment and the registered models (source, serving) a project's params.yaml uses."""
    from flows.deploy import source_model_name
    from tasks.config.loading import load_settings

    settings = load_settings(params_path)
    models = [source_model_name(settings), settings.train.registered_model_name, settings.registry.serving_model_name]
    return settings.registry.experiment, sorted(set(models))


def main(argv: list[str] | None = None) -> int:
    """CLI: grant access for the project at --params; the server URL and credentials come from the environment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--url", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)
    missing = [name for name in (*ADMIN_ENV, *USER_ENV) if not os.environ.get(name)] + ([] if args.url else ["--url"])
    if missing:
        print(f"error: set {', '.join(missing)} (see infra/.env.example)", file=sys.stderr)
        return 2
    experiment, models = names_from_params(args.params)
    try:
        granted = grant_requant_access(args.url, tuple(os.environ[n] for n in ADMIN_ENV),
                                       tuple(os.environ[n] for n in USER_ENV), experiment, models)
    except (AccessError, httpx.HTTPError) as exc:
        print(f"error: MLflow access set-up failed: {exc}", file=sys.stderr)
        return 2
    print(f"user {os.environ[USER_ENV[0]]}: {PERMISSION} on experiment {experiment} ({granted['experiment_id']}) "
          f"and registered models {', '.join(models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
