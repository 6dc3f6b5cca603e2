"""Renders, lints and validates the deploy artifacts, for tests/it/deploy.rs.

`deploy_check.py OUT.json` renders the Helm chart deploy/helm/kiam-rs with real Helm (the
helm-python-sdk wraps Helm's own Go SDK) for every value set in CASES and for the `helm` commands of docs/*.md, lints it, renders the
kustomize base and overlays with `kubectl kustomize`, validates every object strictly against
the Kubernetes OpenAPI schemas of a current version (kubernetes-validate), and checks that the
committed kustomize base is what the chart renders and that each overlay equals the chart with
the overlay's values, and that the guides' JSON blocks parse and the overlays they name exist. It writes the objects and every problem found to OUT.json; the Rust test
parses the objects as k8s-openapi types and asserts on them.

`deploy_check.py --write-base` regenerates the generated manifests (deploy/kustomize/base/kiam-rs.yaml
and deploy/kustomize/overlays/kube2iam/kube2iam.yaml) from the chart.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy/helm/kiam-rs"
KUSTOMIZE = ROOT / "deploy/kustomize"
BASE_FILE = KUSTOMIZE / "base/kiam-rs.yaml"
KUBE2IAM_FILE = KUSTOMIZE / "overlays/kube2iam/kube2iam.yaml"
RELEASE, NAMESPACE = "kiam", "kube-system"

# The kustomize base: the chart's defaults, with TLS from secrets the user creates (as kiam's
# deploy/ manifests: kiam-agent-tls and kiam-server-tls), so that nothing random is rendered.
BASE_VALUES = {"agent": {"tlsSecret": "kiam-agent-tls"}, "server": {"tlsSecret": "kiam-server-tls"}}

# kube2iam mode alone, installing its DNAT rule (kube2iam's own kustomize base: --iptables=true).
KUBE2IAM_VALUES = {
    "agent": {"enabled": False},
    "server": {"enabled": False},
    "kube2iam": {"enabled": True, "host": {"iptables": True}},
}

# The generated files of deploy/kustomize, each the chart rendered with these values.
GENERATED = {BASE_FILE: BASE_VALUES, KUBE2IAM_FILE: KUBE2IAM_VALUES}

# Each overlay equals the chart rendered with the base values merged with these (kube2iam: its
# own generated file, with KUBE2IAM_VALUES alone).
OVERLAY_VALUES = {
    "iptables": {"agent": {"host": {"iptables": True}}},
    "node-certificates": {"agent": {"tlsHostPath": "/etc/kiam/tls", "requireImdsv2": True}},
    "mixed-fleet": {"server": {"agentNodeBinding": False}},
}
OVERLAY_FULL_VALUES = {"kube2iam": KUBE2IAM_VALUES}

B64 = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="

CASES = {
    "default": {},
    # A values file written for the community kiam chart.
    "kiam-values": {
        "extraArgs": {"grpc-keepalive-timeout-duration": "3s"},
        "imagePullSecrets": "regcred",
        "agent": {
            "image": {"repository": "registry.example/kiam-rs", "tag": "v1"},
            "whiteListRouteRegexp": "^/latest/meta-data/placement/",
            "host": {"iptables": True, "interface": "!eth0", "port": 8181},
            "keepaliveParams": {"time": "10s", "permitWithoutStream": True},
            "extraArgs": {"iptables-check-interval": "10s", "allow-ip-query": "false"},
            "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}],
            "tlsSecret": "kiam-agent-tls",
            "deepLivenessProbe": True,
            "priorityClassName": "system-node-critical",
            "tolerations": [{"operator": "Exists"}],
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        },
        "server": {
            "deployment": {"enabled": True, "replicas": 2},
            "roleBaseArn": "arn:aws:iam::123456789012:role/",
            "assumeRoleArn": "arn:aws:iam::123456789012:role/kiam-server",
            "sessionDuration": "15m",
            "tlsSecret": "kiam-server-tls",
            "keepaliveParams": {"maxConnectionAge": "10m", "maxConnectionAgeGrace": "1m"},
            "extraArgs": {"session-refresh": "2m"},
            "extraEnv": {"AWS_STS_REGIONAL_ENDPOINTS": "regional"},
            "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
            "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
            "sslCertHostPath": "/etc/pki/ca-trust/extracted/pem",
        },
        "serviceAccounts": {"server": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kiam-server"}}},
    },
    # Per-node certificates prove the node instead of tokens.
    "node-certificates": {
        "server": {"agentNodeBinding": True},
        "agent": {"tlsHostPath": "/etc/kiam/tls", "requireImdsv2": True},
    },
    # Tokens with another audience and lifetime, for an agent ServiceAccount named by the user.
    "node-token": {
        "agent": {"nodeToken": {"audience": "kiam.example", "expirationSeconds": 7200}},
        "serviceAccounts": {"agent": {"name": "node-agent"}},
    },
    # What users asked kiam for: ServiceAccount roles, session tags, node readiness.
    "issue-16": {
        "server": {
            "serviceAccountRoles": True,
            "sessionTags": ["kubernetes-namespace", "eks-cluster-name"],
            "clusterName": "prod",
            "nodeReadiness": {"taint": "kiam.amazonaws.com/agent-not-ready", "reapply": True},
        },
    },
    # No node proof and no binding: kiam's behaviour, as while kiam agents still run.
    "no-node-binding": {"server": {"agentNodeBinding": False}, "agent": {"nodeToken": {"enabled": False}}},
    "servicemonitor": {
        "agent": {"prometheus": {"servicemonitor": {"enabled": True, "labels": {"release": "prom"}}}},
        "server": {"prometheus": {"servicemonitor": {"enabled": True, "interval": "30s"}}},
    },
    "cert-manager": {"certManager": {"enabled": True, "serverDnsNames": ["kiam.example"]}},
    "tls-files": {
        "agent": {"tlsFiles": {"ca": B64, "cert": B64, "key": B64}},
        "server": {"tlsFiles": {"ca": B64, "cert": B64, "key": B64}},
    },
    "hardened": {
        "server": {
            "deployment": {"enabled": True},
            "useHostNetwork": True,
            "priorityClassName": "system-cluster-critical",
            "podDisruptionBudget": {"maxUnavailable": 2},
            "networkPolicy": {
                "enabled": True,
                "grpcFrom": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
        },
        "agent": {"prometheus": {"scrape": False}},
    },
    # Pods' identity by token on 169.254.170.23; per-node certificates, so only the container
    # endpoint needs TokenReview.
    "container-endpoint": {
        "server": {"agentNodeBinding": True},
        "agent": {"tlsHostPath": "/etc/kiam/tls", "host": {"iptables": True, "containerEndpoint": True}},
    },
    # The admission webhook beside the container endpoint.
    "webhook": {
        "webhook": {"enabled": True, "caBundle": B64},
        "agent": {"host": {"iptables": True, "containerEndpoint": True}},
    },
    "server-only-high-port": {"agent": {"enabled": False}, "server": {"service": {"targetPort": 9610}}},
    # kube2iam mode with the chart's defaults.
    "kube2iam": {"agent": {"enabled": False}, "server": {"enabled": False}, "kube2iam": {"enabled": True}},
    # A values file written for kube2iam's chart, nested under kube2iam:.
    "kube2iam-values": {
        "agent": {"enabled": False},
        "server": {"enabled": False},
        "imagePullSecrets": "regcred",
        "kube2iam": {
            "enabled": True,
            "image": {"repository": "registry.example/kiam-rs", "tag": "v1", "pullSecrets": ["mirror"]},
            "host": {"iptables": True, "interface": "eni+", "port": 8182},
            "extraArgs": {
                "base-role-arn": "arn:aws:iam::123456789012:role/",
                "default-role": "kube2iam-default",
                "namespace-restrictions": True,
                "namespace-restriction-format": "regexp",
                "debug": "",
                "auto-discover-base-arn": "false",
            },
            "extraEnv": {"AWS_STS_REGIONAL_ENDPOINTS": "regional"},
            "aws": {"region": "eu-west-1"},
            "verbose": True,
            "prometheus": {
                "metricsPort": 9181,
                "service": {"enabled": True, "annotations": {"example.com/scrape": "true"}},
                "serviceMonitor": {"enabled": True, "interval": "30s", "labels": {"release": "prom"}},
            },
            "tolerations": [{"operator": "Exists"}],
            "priorityClassName": "system-node-critical",
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            "updateStrategy": "RollingUpdate",
            "maxUnavailable": 2,
            "podAnnotations": {"example.com/team": "platform"},
        },
        "serviceAccounts": {"kube2iam": {"name": "kube2iam"}},
    },
    # kube2iam's chart default: metrics on the app port, which kube2iam mode does not serve.
    "kube2iam-metrics-on-app-port": {
        "agent": {"enabled": False},
        "server": {"enabled": False},
        "kube2iam": {
            "enabled": True,
            "prometheus": {"metricsPort": 8181, "service": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        },
    },
}

# Value sets the chart must refuse, with a word the message must hold.
REFUSED = {
    # kube2iam mode and the agent both answer 169.254.169.254 on every node.
    "kube2iam-with-agent": ({"kube2iam": {"enabled": True}}, "agent.enabled=false"),
}

DOCS = ROOT / "docs"


def docs_values(errors):
    """The --set values of each `helm install`/`helm upgrade` command in docs/*.md, as cases
    named `docs/<guide>#<n>`, so the guides' commands are rendered, linted and validated like any
    case. A command with --reuse-values starts from the guide's previous command's values, as
    Helm would; `-f NAME.yaml` takes the guide's ```yaml block whose first line is `# NAME.yaml`
    (other files, such as the reader's own values, are left out). Every key must exist in values.yaml (Helm would accept a misspelt one silently),
    except under maps that are empty by default (extraArgs, annotations): the flag parser checks
    extraArgs."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    cases = {}
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text().replace("\\\n", " ")
        files = {
            name: yaml.safe_load(textwrap.dedent(body))
            for name, body in re.findall(r"```yaml\n *# ([A-Za-z0-9_.-]+\.yaml)\n(.*?)```", text, re.S)
        }
        values, n = {}, 0
        for line in text.splitlines():
            if "helm install" not in line and "helm upgrade" not in line:
                continue
            if "deploy/helm/kiam-rs" not in line:
                errors.append(f"{doc.name}: a helm command not naming deploy/helm/kiam-rs: {line.strip()}")
            words = line.split()
            if "--reuse-values" not in words:
                values = {}
            for i, word in enumerate(words[:-1]):
                if word in ("-f", "--values") and words[i + 1] in files:
                    values = merge(values, files[words[i + 1]])
            for i, word in enumerate(words[:-1]):
                if word == "--set":
                    parsed = helm_python.parse_set_string(words[i + 1])
                    for path in leaf_paths(parsed):
                        node = defaults
                        for key in path:
                            if node == {}:
                                break
                            if not isinstance(node, dict) or key not in node:
                                errors.append(f"{doc.name}: --set {'.'.join(path)} is not a chart value")
                                break
                            node = node[key]
                    values = merge(values, parsed)
            n += 1
            cases[f"docs/{doc.stem}#{n}"] = values
    return cases


def docs_references(errors):
    """Every ```json block of docs/*.md parses, and every kustomize overlay the guides name exists."""
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for block in re.findall(r"```json\n(.*?)```", text, re.S):
            try:
                json.loads(block)
            except json.JSONDecodeError as e:
                errors.append(f"{doc.name}: a JSON block does not parse: {e}")
        for overlay in re.findall(r"deploy/kustomize/overlays/([A-Za-z0-9_-]+)", text):
            if not (KUSTOMIZE / "overlays" / overlay / "kustomization.yaml").is_file():
                errors.append(f"{doc.name}: no overlay deploy/kustomize/overlays/{overlay}")


def leaf_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


# Custom resources: no upstream schema; checked for their required shape here instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["selector", "endpoints"],
    ("cert-manager.io/v1", "Certificate"): ["secretName", "issuerRef"],
    ("cert-manager.io/v1", "Issuer"): [],
}


def merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_chart(values):
    files = helm_python.Chart.load(str(CHART)).render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for name in sorted(files):
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(files[name]) if d)
    return docs


def kustomize(path):
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(objects, version, where, errors):
    for obj in objects:
        label = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        custom = CUSTOM_KINDS.get((obj.get("apiVersion"), obj.get("kind")))
        if custom is not None:
            missing = [k for k in custom if k not in obj.get("spec", {})]
            if missing or not obj.get("metadata", {}).get("name"):
                errors.append(f"{label}: missing {missing or 'metadata.name'}")
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{label}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{label}: no schema for {obj.get('apiVersion')}")


def comparable(objects):
    """Objects keyed by kind/name, without the namespace kustomize adds."""
    out = {}
    for obj in objects:
        obj = json.loads(json.dumps(obj))
        obj.get("metadata", {}).pop("namespace", None)
        out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


def generated_text(values):
    header = (
        "# Generated from deploy/helm/kiam-rs by `bash scripts/render-manifests`; do not edit.\n"
        "# tests/it/deploy.rs fails when this file and the chart disagree.\n"
    )
    return header + yaml.safe_dump_all(render_chart(values), sort_keys=True)


def check(out_path):
    version = kubernetes_validate.latest_version()
    errors, cases, overlays = [], {}, {}
    all_cases = dict(CASES, **docs_values(errors))
    docs_references(errors)
    for name, values in all_cases.items():
        lint = helm_python.lint(str(CHART), values=values, namespace=NAMESPACE, strict=True)
        errors.extend(f"lint {name}: {e}" for e in lint.get("errors") or [])
        errors.extend(f"lint {name}: {m}" for m in lint.get("messages") or [] if m.get("severity", 0) > 1)
        objects = render_chart(values)
        validate(objects, version, f"chart {name}", errors)
        cases[name] = objects
    refused = {}
    for name, (values, word) in REFUSED.items():
        try:
            render_chart(values)
            errors.append(f"chart {name}: rendered, but must be refused")
        except helm_python.errors.HelmRenderError as e:
            refused[name] = str(e)
            if word not in str(e):
                errors.append(f"chart {name}: refused without saying {word!r}: {e}")
    for path, values in GENERATED.items():
        if path.read_text() != generated_text(values):
            errors.append(f"{path.relative_to(ROOT)} is stale: run bash scripts/render-manifests")
    base = kustomize(KUSTOMIZE / "base")
    validate(base, version, "kustomize base", errors)
    overlays["base"] = base
    if comparable(base) != comparable(render_chart(BASE_VALUES)):
        errors.append("kustomize base differs from the chart with the base values")
    overlay_values = {name: merge(BASE_VALUES, extra) for name, extra in OVERLAY_VALUES.items()}
    overlay_values.update(OVERLAY_FULL_VALUES)
    for name, values in overlay_values.items():
        objects = kustomize(KUSTOMIZE / "overlays" / name)
        validate(objects, version, f"kustomize {name}", errors)
        overlays[name] = objects
        want, got = comparable(render_chart(values)), comparable(objects)
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                errors.append(f"overlay {name}: {key} differs from the chart with {json.dumps(values)}")
    report = {
        "kubernetes_version": version,
        "errors": errors,
        "cases": cases,
        "refused": refused,
        "kustomize": overlays,
    }
    Path(out_path).write_text(json.dumps(report))


def main():
    if sys.argv[1:] == ["--write-base"]:
        for path, values in GENERATED.items():
            path.write_text(generated_text(values))
    elif len(sys.argv) == 2:
        check(sys.argv[1])
    else:
        sys.exit("usage: deploy_check.py OUT.json | --write-base")


if __name__ == "__main__":
    main()
