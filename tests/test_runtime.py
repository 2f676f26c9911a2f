"""`requant run`'s warm start: Prefect's temporary server is started (and used by the flow) while
libraries load. Run in a fresh interpreter without a Prefect API URL, as a user's first run is."""

import os
import subprocess
import sys
import textwrap


def test_warm_start_starts_the_temporary_server_the_flow_then_uses(tmp_path):
    script = textwrap.dedent("""
        import httpx
        from flows import runtime

        runtime.configure()
        runtime.warm_start(preload=("json",))
        from prefect import flow, get_client
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect's client uses without an API URL
        assert server.running and httpx.get(server.api_url + "/health").status_code == 200

        @flow
        def hello() -> str:
            with get_client(sync_client=True) as client:
                return str(client.api_url)

        used = hello()
        print("SAME" if used.rstrip("/") == server.api_url.rstrip("/") else f"DIFFERENT {used} {server.api_url}")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database, not the user's
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "SAME"
