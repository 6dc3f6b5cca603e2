"""Renders, lints and validates the deploy artifacts, for tests/it/deploy/render.rs.

`deploy_check.py OUT.json` renders the Helm chart deploy/helm/kiam-rs with real Helm (the
helm-python-sdk wraps Helm's own Go SDK) for every value set in CASES and for the `helm` commands of docs/*.md, lints it, renders the
kustomize base, overlays and every combination of its components (each pair and the three, in
every order) with `kubectl kustomize`, validates every object strictly against the Kubernetes
OpenAPI schemas of a current version (kubernetes-validate), and checks that the committed
kustomize base is what the chart renders, that each overlay and each combination of components
equals the chart with their values merged, and that the guides' JSON blocks parse and the
overlays and components they name exist. It writes the objects and every problem found to OUT.json; the Rust test
parses the objects as k8s-openapi types and asserts on them.

`deploy_check.py --render VALUES_JSON OUT.json` writes the chart's objects for those values,
hooks included, as a JSON list.

`deploy_check.py --write-base` regenerates the generated manifests (deploy/kustomize/base/kiam-rs.yaml
and deploy/kustomize/overlays/kube2iam/kube2iam.yaml) from the chart.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
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

# Each component (deploy/kustomize/components) equals the chart rendered with the base values
# merged with these; so does its overlay (the base with that component alone), and so does any
# combination of components, with their values merged. kube2iam's overlay is its own generated
# file, with KUBE2IAM_VALUES alone.
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
    # Servers that share identities, with their own STS budget (issue 31).
    "scale-out": {"server": {"deployment": {"enabled": True}, "peers": True, "stsRate": 20}},
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
    # The kernel's per-source connection limit in front of the agent, and of kube2iam mode.
    "connlimit": {"agent": {"host": {"iptables": True, "iptablesConnlimit": 128}}},
    "kube2iam-connlimit": {
        "agent": {"enabled": False},
        "server": {"enabled": False},
        "kube2iam": {"enabled": True, "host": {"iptables": True, "iptablesConnlimit": 128}},
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
            # Commands only: a line that starts with one (prose and headings may name them).
            if line.split()[:2] not in (["helm", "install"], ["helm", "upgrade"]):
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
        for kind, name in re.findall(r"deploy/kustomize/(overlays|components)/([A-Za-z0-9_-]+)", text):
            if not (KUSTOMIZE / kind / name / "kustomization.yaml").is_file():
                errors.append(f"{doc.name}: no deploy/kustomize/{kind}/{name}")


def leaf_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


# Custom resources: no upstream schema; checked for their required shape here instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["selector", "endpoints"],
    ("monitoring.coreos.com/v1", "PodMonitor"): ["selector", "podMetricsEndpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["groups"],
    ("cert-manager.io/v1", "Certificate"): ["secretName", "issuerRef"],
    ("cert-manager.io/v1", "Issuer"): [],
}


def merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_chart(values, hooks=False):
    """The chart's objects; with `hooks`, also its hooks (the `helm test` Pod), which installs
    and the kustomize manifests leave out."""
    files = helm_python.Chart.load(str(CHART)).render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for name in sorted(files):
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(files[name]) if d)
    is_hook = lambda d: "helm.sh/hook" in (d.get("metadata", {}).get("annotations") or {})
    return [d for d in docs if hooks or not is_hook(d)]


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


def combination(names):
    """The base with these components, in this order, as a user's own kustomization would list
    them: written to a temporary directory outside the tree (paths relative: kustomize refuses
    absolute ones)."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(KUSTOMIZE, tmp)
        text = yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{rel}/base"],
                "components": [f"{rel}/components/{name}" for name in names],
            }
        )
        Path(tmp, "kustomization.yaml").write_text(text)
        return kustomize(tmp)


# Lists that Kubernetes keys by a field and whose order means nothing here: strategic merge
# patches add new entries at the front, so a component's entries land where the chart's
# template order does not put them. (An env entry's order would matter only for a $(VAR)
# reference to an earlier entry; none of the chart's has one.) An empty list is no list.
KEYED_LISTS = {"env": "name", "volumes": "name", "volumeMounts": "mountPath"}


def normalise(node):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in KEYED_LISTS and isinstance(value, list):
                if not value:
                    continue
                value = sorted(value, key=lambda entry: str(entry.get(KEYED_LISTS[key])))
            out[key] = normalise(value)
        return out
    if isinstance(node, list):
        return [normalise(v) for v in node]
    return node


def comparable(objects):
    """Objects keyed by kind/name, without the namespace kustomize adds, keyed lists sorted."""
    out = {}
    for obj in objects:
        obj = normalise(json.loads(json.dumps(obj)))
        obj.get("metadata", {}).pop("namespace", None)
        out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


RENDERED = {}


def compare(name, objects, values, errors):
    key = json.dumps(values, sort_keys=True)
    if key not in RENDERED:
        RENDERED[key] = comparable(render_chart(values))
    want, got = RENDERED[key], comparable(objects)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            errors.append(f"kustomize {name}: {key} differs from the chart with {json.dumps(values)}")


def generated_text(values):
    header = (
        "# Generated from deploy/helm/kiam-rs by `bash scripts/render-manifests`; do not edit.\n"
        "# tests/it/deploy/render.rs fails when this file and the chart disagree.\n"
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
        objects = render_chart(values, hooks=True)
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
        compare(name, objects, values, errors)
    # Every pair of components and all of them, in every order: each reported as its names in
    # sorted order joined by "+", e.g. "iptables+mixed-fleet".
    components = sorted(p.name for p in (KUSTOMIZE / "components").iterdir())
    if components != sorted(OVERLAY_VALUES):
        errors.append(f"components {components} are not those of OVERLAY_VALUES")
    for size in range(2, len(components) + 1):
        for chosen in itertools.combinations(components, size):
            values = BASE_VALUES
            for name in chosen:
                values = merge(values, OVERLAY_VALUES[name])
            for i, order in enumerate(itertools.permutations(chosen)):
                label = "+".join(order)
                objects = combination(order)
                if i == 0:  # the other orders must equal the same chart rendering
                    validate(objects, version, f"kustomize {label}", errors)
                    overlays["+".join(chosen)] = objects
                compare(label, objects, values, errors)
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
    elif len(sys.argv) == 4 and sys.argv[1] == "--render":
        Path(sys.argv[3]).write_text(json.dumps(render_chart(json.loads(sys.argv[2]), hooks=True)))
    elif len(sys.argv) == 2:
        check(sys.argv[1])
    else:
        sys.exit("usage: deploy_check.py OUT.json | --write-base | --render VALUES_JSON OUT.json")


if __name__ == "__main__":
    main()
