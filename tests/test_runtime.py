"""`requant run`'s Prefect API: without a configured server, a temporary one is started (while
libraries load), used by the flow, and stopped by its PID afterwards. Run in a fresh interpreter
without a Prefect API URL, as a user's first run is."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def test_a_temporary_server_is_started_used_by_the_flow_and_stopped(tmp_path):
    script = textwrap.dedent("""
        import urllib.request
        from flows import runtime

        runtime.configure()
        from prefect import flow, get_client

        @flow
        def api_used() -> str:
            with get_client(sync_client=True) as client:
                return str(client.api_url)

        with runtime.prefect_api(preload=("json",)) as url:
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                assert answer.status == 200
            used = api_used()
        print("USED", used.rstrip("/") == url.rstrip("/"))
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            print("STOPPED False")
        except OSError:
            print("STOPPED True")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database, not the user's
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "USED True" in lines and "STOPPED True" in lines


def test_with_a_configured_server_nothing_is_started(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import runtime

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with runtime.prefect_api(preload=("json",)) as url:
            assert url is None and PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
