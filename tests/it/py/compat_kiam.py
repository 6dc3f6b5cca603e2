"""The community kiam chart (uswitch/kiam helm/kiam 6.1.2), as facts for compat_check.py.

UPSTREAM is every key of that chart's values.yaml with its default there (comments and order are
ours); TEMPLATE_ONLY_KEYS are keys its templates read that values.yaml leaves out. CHANGES says,
for each key, what the kiam chart's templates do when it changes, as checks on our render.
"""

from compat_checks import (
    arg, change, container, contains, env, exists, gone, item, no_arg, no_env, no_workload, obj, pod, probe, refuse,
    workload,
)

NAME = "kiam"
IMAGE = {"repository": "registry.example/kiam-rs", "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
UPSTREAM_IMAGE = {"repository": "quay.io/uswitch/kiam", "tag": "v4.0", "pullPolicy": "IfNotPresent"}
PROBE5 = {"initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
MONITOR = {"enabled": False, "path": "/metrics", "interval": "10s", "labels": {}}
KEEPALIVE = {"time": None, "timeout": None}
TLS_FILES = {"ca": None, "cert": None, "key": None}
TLS_NAMES = {"certFileName": "cert", "keyFileName": "key", "caFileName": "ca"}


def _component(name, extra):
    common = {
        "enabled": True, "name": name, "image": dict(UPSTREAM_IMAGE),
        "log": {"jsonOutput": True, "level": "info"},
        "prometheus": {"scrape": True, "port": 9620, "syncInterval": "5s", "servicemonitor": dict(MONITOR)},
        "podAnnotations": {}, "podLabels": {}, "serviceAnnotations": {}, "serviceLabels": {},
        "priorityClassName": "", "updateStrategy": "OnDelete", "nodeSelector": {}, "tolerations": [],
        "affinity": {}, "resources": {}, "extraArgs": {}, "extraEnv": [], "extraHostPathMounts": [],
        "initContainers": [], "gatewayTimeoutCreation": "1s", "tlsFiles": dict(TLS_FILES), "tlsSecret": None,
        "tlsCerts": dict(TLS_NAMES), "seLinuxOptions": {},
    }
    common.update(extra)
    return common


UPSTREAM = {
    "extraArgs": {},
    "imagePullSecrets": {},
    "agent": _component("agent", {
        "deepLivenessProbe": False,
        "host": {"iptables": False, "iptablesRemoveOnShutdown": False, "port": 8181, "interface": "cali+"},
        "dnsPolicy": "ClusterFirstWithHostNet",
        "keepaliveParams": dict(KEEPALIVE),
        "livenessProbe": {"initialDelaySeconds": 3, "periodSeconds": 3, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
    }),
    "server": _component("server", {
        "deployment": {"enabled": False, "replicas": 3},
        "sslCertHostPath": "/usr/share/ca-certificates",
        "service": {"port": 443, "targetPort": 443},
        "keepaliveParams": dict(KEEPALIVE, maxConnectionIdle=None, maxConnectionAge=None, maxConnectionAgeGrace=None),
        "probes": {"serverAddress": "127.0.0.1"},
        "roleBaseArn": None, "cache": {"syncInterval": "1m"}, "assumeRoleArn": None, "sessionDuration": "15m",
        "useHostNetwork": False,
        "livenessProbe": dict(PROBE5),
        "readinessProbe": dict(PROBE5, initialDelaySeconds=3),
        "disableStrictNamespaceRegexp": False,
    }),
    "rbac": {"create": True},
    "psp": {"create": False},
    "serviceAccounts": {
        "agent": {"create": True, "name": None, "annotations": {}},
        "server": {"create": True, "name": None, "annotations": {}},
    },
}

# Read by the templates, absent from values.yaml (allowRouteRegexp and permitWithoutStream are
# commented out there; the agent template reads keepaliveParams.PermitWithoutStream).
TEMPLATE_ONLY_KEYS = [
    "nameOverride", "fullnameOverride", "agent.fullnameOverride", "server.fullnameOverride",
    "agent.allowRouteRegexp", "agent.keepaliveParams.PermitWithoutStream",
    "agent.prometheus.servicemonitor.namespace", "server.prometheus.servicemonitor.namespace",
]

# As written, the file names kiam's image, which does not take kiam-rs's arguments.
REFUSED_AS_WRITTEN = "image.repository"
FILE_FIXES = {"agent.image": IMAGE, "server.image": IMAGE}

PEM = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJrVENCK3dJSkFLSE9NRXhBTVBMRU1BMEdDU3FHU0liM0RRRUJCUVVBCi0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K"
KEY = "LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpNSUlFb3dJQkFBS0NBUUVBenp6ZlVrVjE5SDR2CkVYQU1QTEUKLS0tLS1FTkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K"
# ci/test-values.yaml: longer gateway timeouts, a role base ARN, and TLS files given as base64
# PEM (here stand-ins of the same shape, not kiam's test keys).
CI = {
    "agent": {"gatewayTimeoutCreation": "60s", "tlsFiles": {"key": KEY, "cert": PEM, "ca": PEM}},
    "server": {"gatewayTimeoutCreation": "60s", "roleBaseArn": "arn:aws:iam::0123456789:role/",
               "tlsFiles": {"key": KEY, "cert": PEM, "ca": PEM}},
}
OTHER_FILES = {"ci": CI}


def merge_file(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_file(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def wrap(values):
    return values


def key_of(path):
    return path


def check_file(name, objects):
    from compat_check import View

    r, problems = View(objects), []
    want = {"agent": ["--prometheus-sync-interval=5s", "--gateway-timeout-creation=1s", "--host-interface=cali+"],
            "server": ["--session-duration=15m", "--sync=1m", "--role-base-arn-autodetect"]}
    if name == "ci":
        want = {"agent": ["--gateway-timeout-creation=60s"], "server": ["--role-base-arn=arn:aws:iam::0123456789:role/"]}
        if (r.get("Secret", "kiam-agent") or {}).get("data", {}).get("cert") != PEM:
            problems.append("the agent's tlsFiles are not its secret")
        liveness = r.container("server")["livenessProbe"]["exec"]["command"]
        if "--gateway-timeout-creation=60s" not in liveness:
            problems.append(f"server.gatewayTimeoutCreation is not in the probe: {liveness}")
    for component, flags in want.items():
        problems += [f"{component}: no {f}" for f in flags if f not in r.args(component)]
    for kind, name_ in [("ServiceAccount", "kiam-agent"), ("ServiceAccount", "kiam-server"), ("DaemonSet", "kiam-server")]:
        if r.get(kind, name_) is None:
            problems.append(f"no {kind}/{name_}")
    if r.pod("server")["volumes"][1].get("hostPath") != {"path": "/usr/share/ca-certificates"}:
        problems.append("server.sslCertHostPath is not mounted")
    return problems


DS, DEP, SVC, SA = "DaemonSet", "Deployment", "Service", "ServiceAccount"
ANNOTATIONS = ["spec", "template", "metadata", "annotations"]
SM = "ServiceMonitor"
PROM_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": "9620", "prometheus.io/path": "/metrics"}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["iam"]}]}]}}}
MOUNT = [{"name": "ssl-certs", "mountPath": "/etc/pki", "hostPath": "/etc/pki/ca-trust/extracted/pem", "readOnly": True}]
INIT = [{"name": "wait", "image": "registry.example/busybox:1", "command": ["true"]}]
TOLERATIONS = [{"operator": "Exists"}]
RESOURCES = {"requests": {"cpu": "10m", "memory": "32Mi"}}
SELINUX = {"type": "spc_t", "level": "s0"}
ANTI = {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {
    "matchExpressions": [{"key": "app", "operator": "In", "values": ["kiam"]},
                         {"key": "component", "operator": "In", "values": ["server"]}]}}]}
TLS_GIVEN = {"ca": PEM, "cert": PEM, "key": KEY}


def component_changes(c):
    """The keys the agent and the server share, for component c ("agent" or "server")."""
    on = {f"{c}.prometheus.servicemonitor.enabled": True}
    tls_ctx = {f"{c}.tlsFiles.cert": PEM, f"{c}.tlsFiles.key": KEY}
    return [
        change(f"{c}.enabled", False, no_workload(c), gone(SA, f"kiam-{c}"), gone("Secret", f"kiam-{c}")),
        change(f"{c}.image.repository", "registry.example/other/kiam-rs", container(c, ["image"], "registry.example/other/kiam-rs:0.1.0")),
        change(f"{c}.image.tag", "0.2.0", container(c, ["image"], "registry.example/kiam-rs:0.2.0")),
        change(f"{c}.image.pullPolicy", "Always", container(c, ["imagePullPolicy"], "Always")),
        change(f"{c}.log.jsonOutput", False, no_arg(c, "--json-log")),
        change(f"{c}.log.level", "debug", arg(c, "--level=debug")),
        change(f"{c}.prometheus.scrape", False, no_arg(c, "--prometheus-listen-addr"), no_arg(c, "--prometheus-sync-interval")),
        change(f"{c}.prometheus.port", 9621, arg(c, "--prometheus-listen-addr=0.0.0.0:9621"),
               obj(SVC, f"kiam-{c}", ["metadata", "annotations", "prometheus.io/port"], "9621")),
        change(f"{c}.prometheus.syncInterval", "10s", arg(c, "--prometheus-sync-interval=10s")),
        change(f"{c}.prometheus.servicemonitor.enabled", True, exists(SM, f"kiam-{c}")),
        # kiam's chart takes the agent's path and interval from server.*; here each its own.
        change(f"{c}.prometheus.servicemonitor.path", "/m", obj(SM, f"kiam-{c}", ["spec", "endpoints", 0, "path"], "/m"), context=on),
        change(f"{c}.prometheus.servicemonitor.interval", "30s", obj(SM, f"kiam-{c}", ["spec", "endpoints", 0, "interval"], "30s"), context=on),
        change(f"{c}.prometheus.servicemonitor.labels", {"release": "prom"}, contains(SM, f"kiam-{c}", ["metadata", "labels"], {"release": "prom"}), context=on),
        change(f"{c}.prometheus.servicemonitor.namespace", "monitoring",
               obj(SM, f"kiam-{c}", ["metadata", "namespace"], "monitoring"),
               obj(SM, f"kiam-{c}", ["spec", "namespaceSelector", "matchNames"], ["kube-system"]), context=on),
        # kiam users' prometheus.io pod annotations: kept as given, no key twice.
        change(f"{c}.podAnnotations", PROM_ANNOTATIONS, workload(c, ANNOTATIONS, PROM_ANNOTATIONS)),
        change(f"{c}.podLabels", {"team": "platform"}, workload(c, ["spec", "template", "metadata", "labels", "team"], "platform"),
               workload(c, ["spec", "selector", "matchLabels", "team"], "platform")),
        change(f"{c}.serviceAnnotations", {"example.com/a": "b", "prometheus.io/port": "9999"},
               contains(SVC, f"kiam-{c}", ["metadata", "annotations"], {"example.com/a": "b", "prometheus.io/port": "9999", "prometheus.io/scrape": "true"})),
        change(f"{c}.serviceLabels", {"team": "platform", "release": "prod"},
               contains(SVC, f"kiam-{c}", ["metadata", "labels"], {"team": "platform", "release": "prod"})),
        change(f"{c}.priorityClassName", "system-node-critical", pod(c, ["priorityClassName"], "system-node-critical")),
        change(f"{c}.updateStrategy", "RollingUpdate", workload(c, ["spec", "updateStrategy", "type"], "RollingUpdate")),
        change(f"{c}.nodeSelector", {"node-role": "iam"}, pod(c, ["nodeSelector"], {"node-role": "iam"})),
        change(f"{c}.tolerations", TOLERATIONS, pod(c, ["tolerations"], TOLERATIONS)),
        change(f"{c}.affinity", AFFINITY, pod(c, ["affinity"], AFFINITY)),
        change(f"{c}.resources", RESOURCES, container(c, ["resources"], RESOURCES)),
        change(f"{c}.extraArgs", {"grpc-keepalive-time-duration": "20s", "disable-node-view": None},
               arg(c, "--grpc-keepalive-time-duration=20s", "--disable-node-view")),
        refuse(f"{c}.extraArgs", {"json-log": False}, "bare --json-log"),
        change(f"{c}.extraEnv", [{"name": "AWS_REGION", "value": "eu-west-1"}], env(c, "AWS_REGION", "eu-west-1")),
        change(f"{c}.extraHostPathMounts", MOUNT, item(c, "container", "volumeMounts", {"name": "ssl-certs", "mountPath": "/etc/pki", "readOnly": True}),
               item(c, "pod", "volumes", {"name": "ssl-certs", "hostPath": {"path": "/etc/pki/ca-trust/extracted/pem"}})),
        change(f"{c}.initContainers", INIT, pod(c, ["initContainers"], INIT)),
        change(f"{c}.gatewayTimeoutCreation", "60s",
               (arg(c, "--gateway-timeout-creation=60s") if c == "agent"
                else probe(c, "readinessProbe", "exec", {"command": SERVER_PROBE[:-1] + ["--gateway-timeout-creation=60s"] + TLS_ARGS}))),
        change(f"{c}.tlsFiles.ca", PEM, obj("Secret", f"kiam-{c}", ["data"], TLS_GIVEN), context=tls_ctx),
        change(f"{c}.tlsFiles.cert", PEM, obj("Secret", f"kiam-{c}", ["data", "cert"], PEM), context={f"{c}.tlsFiles.ca": PEM, f"{c}.tlsFiles.key": KEY}),
        change(f"{c}.tlsFiles.key", KEY, obj("Secret", f"kiam-{c}", ["data", "key"], KEY), context={f"{c}.tlsFiles.ca": PEM, f"{c}.tlsFiles.cert": PEM}),
        change(f"{c}.tlsSecret", f"my-{c}-tls", gone("Secret", f"kiam-{c}"),
               pod(c, ["volumes", 0, "secret", "secretName"], f"my-{c}-tls")),
        change(f"{c}.tlsCerts.certFileName", "tls.crt", arg(c, "--cert=/etc/kiam/tls/tls.crt")),
        change(f"{c}.tlsCerts.keyFileName", "tls.key", arg(c, "--key=/etc/kiam/tls/tls.key")),
        change(f"{c}.tlsCerts.caFileName", "ca.crt", arg(c, "--ca=/etc/kiam/tls/ca.crt")),
        change(f"{c}.seLinuxOptions", SELINUX, container(c, ["securityContext", "seLinuxOptions"], SELINUX)),
        # ServiceAccount names follow kiam's chart: IRSA trust policies and bindings name them.
        change(f"{c}.fullnameOverride", f"iam-{c}", exists(SA, f"iam-{c}"), gone(SA, f"kiam-{c}"),
               pod(c, ["serviceAccountName"], f"iam-{c}")),
        change(f"{c}.name", f"iam-{c}", exists(SA, f"kiam-iam-{c}"), pod(c, ["serviceAccountName"], f"kiam-iam-{c}"),
               container(c, ["name"], f"kiam-iam-{c}")),
    ]


TLS_ARGS = ["--cert=/etc/kiam/tls/cert", "--key=/etc/kiam/tls/key", "--ca=/etc/kiam/tls/ca"]
SERVER_PROBE = ["/kiam", "health", "--server-address=127.0.0.1:443", "--timeout=5s", "--gateway-timeout-creation=1s"]
PROBE_KEYS = ["initialDelaySeconds", "periodSeconds", "timeoutSeconds", "successThreshold", "failureThreshold"]
S = "server"
DEPLOY = {"server.deployment.enabled": True}
CHANGES = component_changes("agent") + component_changes("server") + [
    change("extraArgs", {"grpc-keepalive-timeout-duration": "3s"},  # kiam's chart ignores it; here both get it
           arg("agent", "--grpc-keepalive-timeout-duration=3s"), arg("server", "--grpc-keepalive-timeout-duration=3s")),
    change("imagePullSecrets", "regcred", pod("agent", ["imagePullSecrets"], [{"name": "regcred"}]),
           pod("server", ["imagePullSecrets"], [{"name": "regcred"}])),
    change("nameOverride", "creds", exists(DS, "kiam-creds-agent"), exists(SA, "kiam-creds-agent"),
           exists(SA, "kiam-creds-server"), workload("agent", ["spec", "selector", "matchLabels", "app"], "creds")),
    # The objects are renamed; the ServiceAccounts are not (kiam's chart does the same).
    change("fullnameOverride", "iam", exists(DS, "iam-agent"), exists(SVC, "iam-server"), obj(SA, "kiam-agent", ["kind"], SA),
           arg("agent", "--server-address=iam-server:443")),
    change("agent.allowRouteRegexp", "^/latest/meta-data/placement/", arg("agent", "--allow-route-regexp=^/latest/meta-data/placement/")),
    change("agent.deepLivenessProbe", True, probe("agent", "livenessProbe", "httpGet", {"path": "/health?deep=1", "port": 8181})),
    # The switches the kustomize components turn are given as the flags' KIAM_* variables.
    change("agent.host.iptables", True, env("agent", "KIAM_IPTABLES", "true"),
           env("agent", "KIAM_IPTABLES_REMOVE", "false"),
           container("agent", ["securityContext", "capabilities", "add"], ["NET_ADMIN", "NET_RAW"])),
    change("agent.host.iptablesRemoveOnShutdown", True, no_env("agent", "KIAM_IPTABLES_REMOVE"),
           no_arg("agent", "--no-iptables-remove"), context={"agent.host.iptables": True}),
    change("agent.host.port", 8182, arg("agent", "--port=8182"), probe("agent", "livenessProbe", "httpGet", {"path": "/ping", "port": 8182})),
    change("agent.host.interface", "eni+", arg("agent", "--host-interface=eni+")),
    change("agent.dnsPolicy", "ClusterFirst", pod("agent", ["dnsPolicy"], "ClusterFirst")),
    change("agent.keepaliveParams.time", "10s", arg("agent", "--grpc-keepalive-time-duration=10s")),
    change("agent.keepaliveParams.timeout", "3s", arg("agent", "--grpc-keepalive-timeout-duration=3s")),
    change("agent.keepaliveParams.PermitWithoutStream", True, arg("agent", "--grpc-keepalive-permit-without-stream")),
    *[change(f"agent.livenessProbe.{k}", 7, probe("agent", "livenessProbe", k, 7)) for k in PROBE_KEYS],
    change("server.deployment.enabled", True, exists(DEP, "kiam-server"), gone(DS, "kiam-server"), exists("PodDisruptionBudget", "kiam-server"),
           workload(S, ["spec", "strategy"], {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
           pod(S, ["affinity", "podAntiAffinity"], ANTI)),
    change("server.deployment.replicas", 2, workload(S, ["spec", "replicas"], 2), context=DEPLOY),
    change("server.sslCertHostPath", "/etc/pki/ca-trust/extracted/pem", pod(S, ["volumes", 1, "hostPath", "path"], "/etc/pki/ca-trust/extracted/pem")),
    change("server.sslCertHostPath", "", container(S, ["volumeMounts"], [{"name": "tls", "mountPath": "/etc/kiam/tls", "readOnly": True}])),
    change("server.service.port", 8443, obj(SVC, "kiam-server", ["spec", "ports", 0, "port"], 8443)),
    change("server.service.targetPort", 9610, arg(S, "--bind=0.0.0.0:9610"), arg("agent", "--server-address=kiam-server:9610"),
           obj(SVC, "kiam-server", ["spec", "ports", 0, "targetPort"], 9610)),
    change("server.keepaliveParams.time", "20s", arg(S, "--grpc-keepalive-time-duration=20s")),
    change("server.keepaliveParams.timeout", "3s", arg(S, "--grpc-keepalive-timeout-duration=3s")),
    change("server.keepaliveParams.maxConnectionIdle", "5m", arg(S, "--grpc-max-connection-idle-duration=5m")),
    change("server.keepaliveParams.maxConnectionAge", "10m", arg(S, "--grpc-max-connection-age-duration=10m")),
    change("server.keepaliveParams.maxConnectionAgeGrace", "1m", arg(S, "--grpc-max-connection-age-grace-duration=1m")),
    change("server.probes.serverAddress", "localhost",
           probe(S, "livenessProbe", "exec", {"command": ["/kiam", "health", "--server-address=localhost:443"] + SERVER_PROBE[3:] + TLS_ARGS})),
    change("server.roleBaseArn", "arn:aws:iam::123456789012:role/", arg(S, "--role-base-arn=arn:aws:iam::123456789012:role/"),
           no_arg(S, "--role-base-arn-autodetect")),
    change("server.cache.syncInterval", "2m", arg(S, "--sync=2m")),
    change("server.assumeRoleArn", "arn:aws:iam::123456789012:role/kiam", arg(S, "--assume-role-arn=arn:aws:iam::123456789012:role/kiam")),
    change("server.sessionDuration", "30m", arg(S, "--session-duration=30m")),
    change("server.useHostNetwork", True, pod(S, ["hostNetwork"], True)),
    change("server.disableStrictNamespaceRegexp", True, arg(S, "--disable-strict-namespace-regexp")),
    *[change(f"server.{p}.{k}", 7, probe(S, p, k, 7)) for p in ("livenessProbe", "readinessProbe") for k in PROBE_KEYS],
    change("rbac.create", False, gone("ClusterRole", "kiam-read"), gone("ClusterRoleBinding", "kiam-write")),
    refuse("psp.create", True, "PodSecurityPolicy"),
    change("serviceAccounts.agent.create", False, gone(SA, "kiam-agent"), pod("agent", ["serviceAccountName"], "default")),
    change("serviceAccounts.agent.name", "node-agent", exists(SA, "node-agent"), env(S, "KIAM_AGENT_SERVICE_ACCOUNT", "kube-system:node-agent")),
    change("serviceAccounts.agent.annotations", {"example.com/a": "b"}, obj(SA, "kiam-agent", ["metadata", "annotations"], {"example.com/a": "b"})),
    change("serviceAccounts.server.create", False, gone(SA, "kiam-server"), pod(S, ["serviceAccountName"], "default")),
    change("serviceAccounts.server.name", "iam-server", exists(SA, "iam-server"),
           obj("ClusterRoleBinding", "kiam-read", ["subjects", 0, "name"], "iam-server")),
    change("serviceAccounts.server.annotations", {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kiam"},
           obj(SA, "kiam-server", ["metadata", "annotations"], {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kiam"})),
]
