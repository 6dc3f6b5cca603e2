"""`helm upgrade` from a kiam or kube2iam release onto deploy/helm/kiam-rs, for tests/it/deploy/upstream.rs.

`compat_check.py OUT.json` renders the chart with real Helm (helm-python-sdk wraps Helm's own Go
SDK, so values.schema.json and every `fail` apply as in `helm upgrade`) for:
- each upstream values file, written as facts in compat_kiam.py and compat_kube2iam.py (the
  community kiam chart 6.1.2's values.yaml and ci/test-values.yaml; kube2iam's chart's values,
  nested under kube2iam:). As written, it names the upstream image, which must be refused by
  name; with a kiam-rs image it must render;
- each key of those files changed on its own, on top of the whole file: the render must change
  as the upstream chart's render changes (each entry says how, and the check asserts it), or
  fail with a message naming the key. Every key of the files must have an entry.
Every rendering is parsed with duplicate mapping keys refused (Helm and kubectl refuse them) and
validated strictly against the Kubernetes schemas (kubernetes-validate). OUT.json holds every
rendering and every problem found; the Rust test parses each container's command line with the
binary's own parser.
"""

import copy
import json
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compat_kiam  # noqa: E402
import compat_kube2iam  # noqa: E402
from deploy_check import CHART, NAMESPACE, RELEASE, validate  # noqa: E402


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML that refuses a mapping key given twice, as Helm's and kubectl's decoders do (parsed
    by libyaml when PyYAML has it: a few hundred renderings are read)."""


def _strict_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


class Refused(Exception):
    pass


_RENDERED = {}


def render(values):
    """The chart's objects for these values (a fresh copy; most changes share the same values
    before them, rendered once); Refused with Helm's message when it fails them."""
    key = json.dumps(values, sort_keys=True)
    if key not in _RENDERED:
        try:
            _RENDERED[key] = ("ok", _render(values))
        except Refused as e:
            _RENDERED[key] = ("refused", str(e))
        except yaml.YAMLError as e:
            _RENDERED[key] = ("yaml", e)
    status, result = _RENDERED[key]
    if status == "refused":
        raise Refused(result)
    if status == "yaml":
        raise result
    return copy.deepcopy(result)


_CHART = []
_VALID = set()


def check_objects(objects, version, where, errors):
    """validate() for the objects not seen before: most objects of a change are the same as
    before it, and schema validation is the costly part."""
    fresh = [o for o in objects if json.dumps(o, sort_keys=True) not in _VALID]
    before = len(errors)
    validate(fresh, version, where, errors)
    if len(errors) == before:
        _VALID.update(json.dumps(o, sort_keys=True) for o in fresh)


def _render(values):
    if not _CHART:
        _CHART.append(helm_python.Chart.load(str(CHART)))
    try:
        files = _CHART[0].render(values=values, name=RELEASE, namespace=NAMESPACE)
    except helm_python.errors.HelmError as e:
        raise Refused(str(e)) from e
    objects = []
    for name in sorted(files):
        if name.endswith(".yaml"):
            objects.extend(d for d in yaml.load_all(files[name], Loader=StrictLoader) if d)
    return objects


def set_path(values, path, value):
    """A copy of values with the dotted key set (replaced, not merged: `{}` clears a map)."""
    out = copy.deepcopy(values)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def leaves(tree, opaque, prefix=""):
    """Every key of a values file down to its values; empty maps, lists and the `opaque` keys
    (maps copied whole into an object) are values."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in opaque:
            yield from leaves(value, opaque, path + ".")
        else:
            yield path


def run_module(module, version, report):
    """One upstream chart: its whole file(s), then each key changed on its own."""
    errors, cases, refused = report["errors"], report["cases"], report["refused"]
    tag = module.NAME
    wrap = module.wrap

    def label(name):
        return f"{tag}: {name}"

    # The file as the user has it: the upstream image must be refused by name.
    try:
        render(wrap(module.UPSTREAM))
        errors.append(label("the upstream values file rendered with the upstream image"))
    except Refused as e:
        refused[label("file as written")] = str(e)
        if module.REFUSED_AS_WRITTEN not in str(e):
            errors.append(label(f"refused without naming {module.REFUSED_AS_WRITTEN}: {e}"))
    base = module.UPSTREAM
    for path, value in module.FILE_FIXES.items():
        base = set_path(base, path, value)
    files = {"file": base}
    for name, extra in getattr(module, "OTHER_FILES", {}).items():
        files[name] = module.merge_file(base, extra)
    for name, values in files.items():
        try:
            objects = render(wrap(values))
        except (Refused, yaml.YAMLError) as e:
            errors.append(label(f"{name} with a kiam-rs image: {e}"))
            continue
        check_objects(objects, version, label(name), errors)
        cases[label(name)] = objects
        for problem in module.check_file(name, objects):
            errors.append(label(f"{name}: {problem}"))

    covered = {change.path for change in module.CHANGES}
    for path in sorted(set(leaves(module.UPSTREAM, getattr(module, "OPAQUE_KEYS", ()))) | set(module.TEMPLATE_ONLY_KEYS)):
        if path not in covered:
            errors.append(label(f"{path}: no change tried"))
    for n, change in enumerate(module.CHANGES):
        name = label(f"{change.path}={json.dumps(change.value)}#{n}")
        before = base
        for path, value in change.context.items():
            before = set_path(before, path, value)
        after = set_path(before, change.path, change.value)
        for path, value in change.also.items():
            after = set_path(after, path, value)
        try:
            want = render(wrap(before))
        except (Refused, yaml.YAMLError) as e:
            errors.append(f"{name}: the values before the change do not render: {e}")
            continue
        try:
            got = render(wrap(after))
        except Refused as e:
            refused[name] = str(e)
            if change.refused is None:
                errors.append(f"{name}: refused: {e}")
            elif change.refused not in str(e) or module.key_of(change.path) not in str(e):
                errors.append(f"{name}: refused without naming {module.key_of(change.path)} ({change.refused}): {e}")
            continue
        except yaml.YAMLError as e:
            errors.append(f"{name}: rendered YAML Helm would refuse: {e}")
            continue
        if change.refused is not None:
            errors.append(f"{name}: rendered, but must be refused naming {module.key_of(change.path)}")
            continue
        check_objects(got, version, name, errors)
        cases[name] = got
        if change.same != (got == want):
            errors.append(f"{name}: the render {'changed' if change.same else 'did not change'}")
        for check in change.checks:
            try:
                check(View(got), View(want))
            except AssertionError as e:
                errors.append(f"{name}: {e}")


class View:
    """One rendering, read by what the tests look for."""

    def __init__(self, objects):
        self.objects = objects

    def get(self, kind, name):
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        return found[0] if found else None

    def kinds(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def workload(self, component):
        """The agent, server or kube2iam-mode workload, by what its container runs (names change)."""
        for obj in self.objects:
            if obj["kind"] in ("DaemonSet", "Deployment"):
                command = obj["spec"]["template"]["spec"]["containers"][0].get("command")
                if (command[1] if command else "kube2iam") == component:
                    return obj
        raise AssertionError(f"no {component} workload")

    def pod(self, component):
        return self.workload(component)["spec"]["template"]["spec"]

    def container(self, component):
        return self.pod(component)["containers"][0]

    def args(self, component):
        return self.container(component).get("args", [])


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: compat_check.py OUT.json")
    version = kubernetes_validate.latest_version()
    report = {"kubernetes_version": version, "errors": [], "cases": {}, "refused": {}}
    for module in (compat_kiam, compat_kube2iam):
        run_module(module, version, report)
    report["changes"] = len(compat_kiam.CHANGES) + len(compat_kube2iam.CHANGES)
    Path(sys.argv[1]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
