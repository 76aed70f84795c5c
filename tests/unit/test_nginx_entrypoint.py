"""docker/nginx/entrypoint.sh with the real nginx: templates rendered, upstream server lines
found in DNS (NGINX_DISCOVER, as in Swarm), and a request proxied through them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT
from vlm_stack.procs import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # installed by scripts/system_packages.sh

TEMPLATE = """
upstream backend {
  ${BACKEND_SERVERS}
}
upstream nowhere {
  ${NOWHERE_SERVERS}
}
server {
  listen 127.0.0.1:${PORT};
  location /nowhere { proxy_pass http://nowhere; }
  location / { proxy_pass http://backend; }
}
"""


class Backend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the http.server API
        body = b"from the backend"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        return


def test_upstreams_come_from_dns_and_requests_pass(tmp_path):
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    (tmp_path / "templates").mkdir()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "templates" / "site.conf.template").write_text(TEMPLATE)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path}/conf.d/*.conf; }}\n"
    )
    # the real nginx, with this test's prefix and main config (the entrypoint calls plain `nginx`)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nginx").write_text(f'#!/bin/sh\nexec {NGINX} -p {tmp_path} -c {tmp_path}/nginx.conf "$@"\n')
    (bin_dir / "nginx").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "NGINX_ENVSUBST_TEMPLATE_DIR": str(tmp_path / "templates"),
        "NGINX_ENVSUBST_OUTPUT_DIR": str(tmp_path / "conf.d"),
        "TMPDIR": str(tmp_path),
        "PORT": str(port),
        "BACKEND_SERVERS": "server unused:1;",
        "NOWHERE_SERVERS": "server unused:1;",
        "NGINX_DISCOVER": f"BACKEND_SERVERS=localhost:{backend.server_port} NOWHERE_SERVERS=no-such-name.invalid:9999",
        "NGINX_DISCOVER_INTERVAL": "1",
    }
    process = subprocess.Popen(
        ["sh", str(ROOT / "docker" / "nginx" / "entrypoint.sh"), "nginx", "-g", "daemon off;"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
                    assert reply.read() == b"from the backend"
                break
            except OSError:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "nginx did not answer"
                time.sleep(0.2)
        rendered = (tmp_path / "conf.d" / "site.conf").read_text()
        assert f"server 127.0.0.1:{backend.server_port};" in rendered
        assert "server 127.0.0.1:9999 down;" in rendered  # a name with no address yet
        assert "unused" not in rendered
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nowhere", timeout=5)
        assert refused.value.code == 502
        time.sleep(2.5)  # two more lookups, nothing changed: no reload
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # nginx and the lookup loop
        _, errors = process.communicate(timeout=20)
        backend.shutdown()
    assert "upstreams from DNS: BACKEND_SERVERS=server 127.0.0.1" in errors
    assert "reloading" not in errors
