"""kube2iam's chart (jtblin/kube2iam charts/kube2iam), as facts for compat_check.py.

A kube2iam values file is used under kiam-rs's `kube2iam:` key, with the agent and the server
off. UPSTREAM is every key of that chart's values.yaml with its default there (ours the words);
TEMPLATE_ONLY_KEYS are keys its templates read that values.yaml leaves out or comments out.
"""

from compat_checks import (
    arg, change, container, contains, env, exists, gone, no_arg, obj, pod, probe, refuse, workload,
)

NAME = "kube2iam"
C = "kube2iam"
IMAGE = {"repository": "registry.example/kiam-rs", "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
PRESTOP = {"preStop": {"exec": {"command": [
    "/bin/sh", "-c", "eval `iptables-save | grep 169.254.169.254 | sed s/-A/'iptables -t nat -D'/g`"]}}}
UPSTREAM = {
    "extraArgs": {},
    "extraEnv": {},
    "host": {"ip": "$(HOST_IP)", "iptables": False, "interface": "docker0", "port": 8181},
    "prometheus": {
        "service": {"enabled": False},
        "serviceMonitor": {"enabled": False, "interval": "10s", "namespace": "", "labels": {}},
    },
    "image": {"repository": "jtblin/kube2iam", "tag": "0.0.0", "pullPolicy": "IfNotPresent"},
    "aws": {"secret_key": "", "access_key": "", "region": ""},
    "existingSecret": "",
    "nodeSelector": {},
    "affinity": {},
    "podAnnotations": {},
    "priorityClassName": "",
    "podLabels": {},
    "livenessProbe": {"enabled": True, "initialDelaySeconds": 30, "periodSeconds": 5, "successThreshold": 1,
                      "failureThreshold": 3, "timeoutSeconds": 1},
    "readinessProbe": {"enabled": True, "initialDelaySeconds": 0, "periodSeconds": 5, "successThreshold": 1,
                       "failureThreshold": 3, "timeoutSeconds": 1},
    "rbac": {"create": False, "serviceAccountName": "default"},
    "resources": {},
    "lifecycle": PRESTOP,
    "updateStrategy": "OnDelete",
    "maxUnavailable": 1,
    "verbose": False,
    "tolerations": [],
    "podSecurityPolicy": {"enabled": False, "annotations": {}},
}
OPAQUE_KEYS = {"lifecycle"}
TEMPLATE_ONLY_KEYS = ["nameOverride", "prometheus.metricsPort", "prometheus.service.annotations", "image.pullSecrets"]

# As written: kube2iam's image, then its iptables preStop hook, are refused by name.
REFUSED_AS_WRITTEN = "kube2iam."
FILE_FIXES = {"image": IMAGE, "lifecycle": {}}
OTHER_FILES = {}


def merge_file(base, extra):
    return base


def wrap(values):
    return {"agent": {"enabled": False}, "server": {"enabled": False}, "kube2iam": dict(values, enabled=True)}


def key_of(path):
    return f"kube2iam.{path}"


def check_file(name, objects):
    from compat_check import View

    r = View(objects)
    problems = [f"no {f}" for f in ["--host-interface=docker0", "--iptables=false", "--app-port=8181"] if f not in r.args(C)]
    if r.pod(C).get("serviceAccountName") != "default" or r.kinds("ClusterRole"):
        problems.append("rbac.create=false: the pod runs as rbac.serviceAccountName, and no RBAC is made")
    if r.container(C).get("lifecycle"):
        problems.append("a lifecycle hook without one given")
    return problems


SECRET_ENV = {"secretKeyRef": {"name": "kiam-kube2iam", "key": "aws_access_key_id"}}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "kube2iam", "operator": "In", "values": ["on"]}]}]}}}
SLEEP = {"preStop": {"sleep": {"seconds": 5}}}
PROBE_KEYS = ["initialDelaySeconds", "periodSeconds", "successThreshold", "failureThreshold", "timeoutSeconds"]
RBAC_ON = {"rbac.create": True}
SM_ON = {"prometheus.serviceMonitor.enabled": True}
SVC_NAME = "kiam-kube2iam"

CHANGES = [
    change("extraArgs", {"base-role-arn": "arn:aws:iam::123456789012:role/", "default-role": "d", "namespace-restrictions": None},
           arg(C, "--base-role-arn=arn:aws:iam::123456789012:role/", "--default-role=d", "--namespace-restrictions")),
    refuse("extraArgs", {"auto-discover-base-arn": False}, "bare --auto-discover-base-arn"),
    change("extraEnv", {"HTTPS_PROXY": "http://proxy:3128"}, env(C, "HTTPS_PROXY", "http://proxy:3128")),
    change("host.ip", "10.0.0.9", arg(C, "--host-ip=10.0.0.9")),
    change("host.iptables", True, arg(C, "--iptables=true"), container(C, ["securityContext", "capabilities", "add"], ["NET_ADMIN", "NET_RAW"])),
    change("host.interface", "eni+", arg(C, "--host-interface=eni+")),
    change("host.port", 8182, arg(C, "--app-port=8182"), probe(C, "livenessProbe", "httpGet", {"path": "/healthz", "port": 8182})),
    change("prometheus.metricsPort", 9543, arg(C, "--metrics-port=9543"), container(C, ["ports", 1, "containerPort"], 9543)),
    change("prometheus.service.enabled", True, exists("Service", SVC_NAME)),
    change("prometheus.service.annotations", {"prometheus.io/scrape": "true"},
           obj("Service", SVC_NAME, ["metadata", "annotations"], {"prometheus.io/scrape": "true"}), context={"prometheus.service.enabled": True}),
    change("prometheus.serviceMonitor.enabled", True, exists("ServiceMonitor", SVC_NAME), exists("Service", SVC_NAME)),
    change("prometheus.serviceMonitor.interval", "30s", obj("ServiceMonitor", SVC_NAME, ["spec", "endpoints", 0, "interval"], "30s"), context=SM_ON),
    change("prometheus.serviceMonitor.namespace", "monitoring", obj("ServiceMonitor", SVC_NAME, ["metadata", "namespace"], "monitoring"), context=SM_ON),
    change("prometheus.serviceMonitor.labels", {"release": "prom"},
           contains("ServiceMonitor", SVC_NAME, ["metadata", "labels"], {"release": "prom"}), context=SM_ON),
    refuse("image.repository", "jtblin/kube2iam", "upstream image"),
    change("image.repository", "registry.example/other", container(C, ["image"], "registry.example/other:0.1.0")),
    change("image.tag", "0.2.0", container(C, ["image"], "registry.example/kiam-rs:0.2.0")),
    change("image.pullPolicy", "Always", container(C, ["imagePullPolicy"], "Always")),
    change("image.pullSecrets", ["regcred"], pod(C, ["imagePullSecrets"], [{"name": "regcred"}])),
    change("aws.access_key", "AKIAEXAMPLE", exists("Secret", "kiam-kube2iam"), env(C, "AWS_ACCESS_KEY_ID", SECRET_ENV),
           obj("Secret", "kiam-kube2iam", ["data", "aws_access_key_id"], "QUtJQUVYQU1QTEU="), also={"aws.secret_key": "secret"}),
    change("aws.secret_key", "secret", obj("Secret", "kiam-kube2iam", ["data", "aws_secret_access_key"], "c2VjcmV0"),
           also={"aws.access_key": "AKIAEXAMPLE"}),
    refuse("aws.secret_key", "secret", "set both or neither"),
    change("aws.region", "eu-west-1", env(C, "AWS_DEFAULT_REGION", "eu-west-1"), env(C, "AWS_REGION", "eu-west-1")),
    change("existingSecret", "aws-keys", env(C, "AWS_SECRET_ACCESS_KEY", {"secretKeyRef": {"name": "aws-keys", "key": "aws_secret_access_key"}})),
    change("nodeSelector", {"kube2iam": "on"}, pod(C, ["nodeSelector"], {"kube2iam": "on"})),
    change("affinity", AFFINITY, pod(C, ["affinity"], AFFINITY)),
    change("podAnnotations", {"example.com/a": "b"}, workload(C, ["spec", "template", "metadata", "annotations"], {"example.com/a": "b"})),
    change("priorityClassName", "system-node-critical", pod(C, ["priorityClassName"], "system-node-critical")),
    change("podLabels", {"team": "platform"}, workload(C, ["spec", "template", "metadata", "labels", "team"], "platform")),
    change("livenessProbe.enabled", False, container(C, ["livenessProbe"], None)),
    change("readinessProbe.enabled", False, container(C, ["readinessProbe"], None)),
    *[change(f"{p}.{k}", 7, probe(C, p, k, 7)) for p in ("livenessProbe", "readinessProbe") for k in PROBE_KEYS],
    change("rbac.create", True, exists("ServiceAccount", "kiam-kube2iam"), exists("ClusterRole", "kiam-kube2iam"),
           obj("ClusterRoleBinding", "kiam-kube2iam", ["subjects", 0, "name"], "kiam-kube2iam"), pod(C, ["serviceAccountName"], "kiam-kube2iam")),
    change("rbac.serviceAccountName", "kube2iam", pod(C, ["serviceAccountName"], "kube2iam")),
    change("resources", {"limits": {"memory": "64Mi"}}, container(C, ["resources"], {"limits": {"memory": "64Mi"}})),
    refuse("lifecycle", PRESTOP, "iptables hook"),
    change("lifecycle", SLEEP, container(C, ["lifecycle"], SLEEP)),
    change("updateStrategy", "RollingUpdate", workload(C, ["spec", "updateStrategy"], {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})),
    change("maxUnavailable", 2, workload(C, ["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"], 2), context={"updateStrategy": "RollingUpdate"}),
    change("verbose", True, arg(C, "--verbose")),
    change("tolerations", [{"operator": "Exists"}], pod(C, ["tolerations"], [{"operator": "Exists"}])),
    refuse("podSecurityPolicy.enabled", True, "PodSecurityPolicy"),
    # Only read when enabled (which is refused): no change, as in kube2iam's chart.
    change("podSecurityPolicy.annotations", {"example.com/a": "b"}, same=True),
    change("nameOverride", "iam", exists("DaemonSet", "kiam-iam"), gone("DaemonSet", "kiam-kube2iam"),
           exists("ServiceAccount", "kiam-iam"), pod(C, ["serviceAccountName"], "kiam-iam"), context=RBAC_ON),
]
