"""Bridge MLflow registry webhooks to Prefect events.

`requant webhook-receiver` runs this HTTP server. For every authentic `model_version.created`
delivery it emits the Prefect event `mlflow.model_version.created` on the resource
`mlflow.model.<name>`; the requantize deployment's trigger (flows/deploy.py) turns that into a run
for the new version. Deliveries with a bad or missing signature get 401 and emit nothing.
"""

from __future__ import annotations

import json
import logging
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tasks.track import webhooks

log = logging.getLogger("requant")
EVENT = "mlflow.model_version.created"
SECRET_ENV = "REQUANT_WEBHOOK_SECRET"


def resource_id(model_name: str) -> str:
    """The Prefect resource id events about a registered model are emitted on."""
    return f"mlflow.model.{model_name}"


def make_handler(secret: str):
    """An HTTP handler class bound to the shared webhook secret."""
    from prefect.events import emit_event

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            problem = webhooks.verify(secret, self.headers, body)
            if problem:
                log.warning("rejected webhook delivery: %s", problem)
                return self._reply(401, {"error": problem})
            created = webhooks.new_model_version(json.loads(body))
            if created:
                name, version = created
                emit_event(event=EVENT, resource={"prefect.resource.id": resource_id(name), "prefect.resource.name": name},
                           payload={"name": name, "version": version,
                                    "delivery_id": self.headers["X-MLflow-Delivery-Id"]})
                log.info("model %s version %s registered: emitted %s", name, version, EVENT)
            self._reply(200, {"ok": True})

        def _reply(self, code: int, payload: dict) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args) -> None:  # access lines would drown the useful ones
            pass

    return Handler


def serve_receiver(host: str, port: int) -> None:
    """Run the receiver until interrupted. The secret comes from REQUANT_WEBHOOK_SECRET."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        from tasks.core.errors import RequantError

        raise RequantError(f"{SECRET_ENV} is not set: export the secret the MLflow webhook was created with")
    server = ThreadingHTTPServer((host, port), make_handler(secret))
    log.info("webhook receiver on http://%s:%d/", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
