"""The vocabulary of compat_kiam.py and compat_kube2iam.py: one changed key and what it must do.

A check is called with the rendering after the change and the one before, and raises
AssertionError saying what differs from what the upstream chart does with the same change.
"""

from dataclasses import dataclass, field


@dataclass
class Change:
    """`path` set to `value` (with `also`) on top of the whole upstream file (plus `context`). Either the render
    fails naming the key and holding `refused`, or it renders and every check holds; `same` says
    the render must not change at all (the upstream chart's does not either)."""

    path: str
    value: object
    checks: list = field(default_factory=list)
    context: dict = field(default_factory=dict)
    refused: str = None
    same: bool = False
    # Set with the change, for keys that only work together (aws.access_key and secret_key).
    also: dict = field(default_factory=dict)


def change(path, value, *checks, context=None, same=False, also=None):
    return Change(path, value, list(checks), context or {}, None, same, also or {})


def refuse(path, value, word, context=None):
    return Change(path, value, [], context or {}, word, False, {})


def dig(obj, path):
    for key in path:
        if isinstance(obj, list):
            obj = obj[key] if isinstance(key, int) and key < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(key)
        else:
            return None
    return obj


def arg(component, *wanted):
    def check(r, _before):
        args = r.args(component)
        for want in wanted:
            assert want in args, f"{component}: {want} not in {args}"

    return check


def no_arg(component, prefix):
    def check(r, _before):
        found = [a for a in r.args(component) if a.startswith(prefix)]
        assert not found, f"{component}: {found} rendered"

    return check


def pod(component, path, want):
    def check(r, _before):
        got = dig(r.pod(component), path)
        assert got == want, f"{component} pod {path}: {got!r}, want {want!r}"

    return check


def container(component, path, want):
    def check(r, _before):
        got = dig(r.container(component), path)
        assert got == want, f"{component} container {path}: {got!r}, want {want!r}"

    return check


def workload(component, path, want):
    def check(r, _before):
        got = dig(r.workload(component), path)
        assert got == want, f"{component} workload {path}: {got!r}, want {want!r}"

    return check


def obj(kind, name, path, want):
    def check(r, _before):
        o = r.get(kind, name)
        assert o is not None, f"no {kind}/{name}: {[x['metadata']['name'] for x in r.kinds(kind)]}"
        got = dig(o, path)
        assert got == want, f"{kind}/{name} {path}: {got!r}, want {want!r}"

    return check


def contains(kind, name, path, want):
    """The map at path holds want's items (others may be there too)."""

    def check(r, _before):
        o = r.get(kind, name)
        assert o is not None, f"no {kind}/{name}"
        got = dig(o, path) or {}
        missing = {k: v for k, v in want.items() if got.get(k) != v}
        assert not missing, f"{kind}/{name} {path}: {got!r} lacks {missing!r}"

    return check


def exists(kind, name):
    def check(r, before):
        assert r.get(kind, name) is not None, f"no {kind}/{name}"
        assert before.get(kind, name) is None, f"{kind}/{name} was there before the change"

    return check


def gone(kind, name):
    def check(r, before):
        assert before.get(kind, name) is not None, f"no {kind}/{name} before the change"
        assert r.get(kind, name) is None, f"{kind}/{name} still rendered"

    return check


def no_workload(component):
    def check(r, _before):
        try:
            r.workload(component)
        except AssertionError:
            return
        raise AssertionError(f"a {component} workload is still rendered")

    return check


def env(component, name, want):
    """The container's env var: a literal value, or a dict compared with its valueFrom."""

    def check(r, _before):
        found = [e for e in r.container(component).get("env", []) if e["name"] == name]
        assert found, f"{component}: no env {name}"
        got = found[0].get("value") if not isinstance(want, dict) else found[0].get("valueFrom")
        assert got == want, f"{component} env {name}: {got!r}, want {want!r}"

    return check


def no_env(component, name):
    def check(r, _before):
        found = [e for e in r.container(component).get("env", []) if e["name"] == name]
        assert not found, f"{component}: env {name} is set: {found}"

    return check


def probe(component, which, key, want):
    return container(component, [which, key], want)


def item(component, where, key, want):
    """The pod's (where="pod") or container's list `key` has an item holding want's fields."""

    def check(r, _before):
        parent = r.pod(component) if where == "pod" else r.container(component)
        items = parent.get(key, [])
        ok = any(all(i.get(k) == v for k, v in want.items()) for i in items)
        assert ok, f"{component} {where} {key}: no item like {want!r} in {items!r}"

    return check
