"""The chart's own certificates across renders, for tests/it/deploy/monitoring.rs.

`chart_tls_check.py OUT.json` renders deploy/helm/kiam-rs with Helm's engine in cluster-aware
mode (helm-python-sdk's Config.render: `lookup` asks a real API client), against a stand-in API
server in this process that serves Secrets from a dict: the discovery document `lookup` needs
(/api/v1) and GET of one Secret, 404 for anything else. Each scenario is the cluster a render
would meet:

- install: nothing exists yet;
- upgrade: the install's secrets exist, as Helm would have created them;
- renew-agent: as upgrade, but the agent secret's not-after annotation is 10 days away;
- legacy: leaf secrets from an older chart (no CA secret, no annotations);
- lost-server: only the agent secret exists and no CA secret;
- offline-1, offline-2: two renders without a cluster (`helm template`), for the GitOps note.

It writes, per scenario, the rendered Secrets (name: {annotations, data}), their data decoded
(`pem`), NOTES.txt and the Secret GETs the stand-in answered; the Rust test asserts on
certificates and keys.
"""

import base64
import json
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy/helm/kiam-rs"
RELEASE, NAMESPACE = "kiam", "kube-system"
NOT_AFTER = "kiam-rs.io/not-after"

RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret", "verbs": ["get", "list"]}
    ],
}


class FakeApi:
    """An API server holding `secrets` ({name: Secret}) in NAMESPACE; records the GETs."""

    def __init__(self):
        self.secrets, self.gets = {}, []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets/"
                if path == "/api/v1":
                    self.answer(200, RESOURCES)
                elif path.startswith(prefix) and path[len(prefix) :] in api.secrets:
                    api.gets.append(path[len(prefix) :])
                    self.answer(200, api.secrets[path[len(prefix) :]])
                else:
                    api.gets.append(path[len(prefix) :] if path.startswith(prefix) else path)
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                    self.answer(404, status)

            def answer(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self):
        port = self.server.server_port
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "user", "user": {"token": "test"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "user", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def secrets_of(files):
    """The rendered Secrets as {name: {annotations, data, type}}."""
    out = {}
    for name, text in files.items():
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc and doc.get("kind") == "Secret":
                    meta = doc["metadata"]
                    out[meta["name"]] = {"annotations": meta.get("annotations", {}), "data": doc["data"], "type": doc["type"]}
    return out


def notes_of(files):
    return next((text for name, text in files.items() if name.endswith("NOTES.txt")), "")


def summary(files, gets):
    secrets = secrets_of(files)
    pem = {name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()} for name, s in secrets.items()}
    return {"secrets": secrets, "pem": pem, "notes": notes_of(files), "gets": gets}


def as_stored(name, secret):
    """A rendered Secret as the API server would return it after Helm created it."""
    meta = {"name": name, "namespace": NAMESPACE, "annotations": dict(secret["annotations"])}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": secret["type"], "data": dict(secret["data"])}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: chart_tls_check.py OUT.json")
    chart = helm_python.Chart.load(str(CHART))
    api = FakeApi()
    report = {}
    try:
        config = helm_python.Config(kubeconfig_content=api.kubeconfig(), namespace=NAMESPACE, storage_driver="memory")

        def render(scenario, stored, upgrade=True):
            api.secrets, api.gets = {name: as_stored(name, s) for name, s in stored.items()}, []
            files = config.render(chart, {}, name=RELEASE, namespace=NAMESPACE, is_install=not upgrade, is_upgrade=upgrade)
            report[scenario] = summary(files, sorted(set(api.gets)))
            return report[scenario]["secrets"]

        installed = render("install", {}, upgrade=False)
        render("upgrade", installed)
        soon = dict(installed)
        ten_days = (datetime.now(timezone.utc) + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
        soon["kiam-agent"] = dict(soon["kiam-agent"], annotations={NOT_AFTER: ten_days})
        render("renew-agent", soon)
        render("legacy", {n: dict(s, annotations={}) for n, s in installed.items() if n != "kiam-ca"})
        render("lost-server", {"kiam-agent": installed["kiam-agent"]})
        for scenario in ("offline-1", "offline-2"):
            files = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
            report[scenario] = summary(files, [])
    finally:
        api.close()
    Path(sys.argv[1]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
