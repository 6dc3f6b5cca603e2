//! The layering of `src/`, checked on the source text: no import cycle between modules, and a
//! pure ground floor (`model`, `policy`) that imports nothing with I/O.
//!
//! A module's imports are the `crate::`, `super::` and `self::` paths its file names (outside
//! comments and its unit-test module), resolved to the longest module that exists. Paths from a
//! parent to its own children are declarations, not imports, and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `agent/handlers.rs` → `agent::handlers`; `agent/mod.rs` → `agent`; `lib.rs` → ``.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The file's code without comments and without its inline unit-test module.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("readable");
    let text = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or("").to_string();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

fn imports(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let paths = regex::Regex::new(r"\b(?:crate|super|self)(?:::\w+)+").expect("regex");
    let mut out = BTreeSet::new();
    for found in paths.find_iter(code) {
        let mut segments: Vec<&str> = found.as_str().split("::").collect();
        let mut base: Vec<&str> = if module.is_empty() { vec![] } else { module.split("::").collect() };
        match segments[0] {
            "crate" => base.clear(),
            "self" => {}
            _ => {
                while segments.first() == Some(&"super") {
                    base.pop();
                    segments.remove(0);
                }
                segments.insert(0, "super");
            }
        }
        let rest = &segments[1..];
        let target = (0..=rest.len())
            .map(|n| base.iter().chain(&rest[..n]).copied().collect::<Vec<_>>().join("::"))
            .rfind(|candidate| modules.contains(candidate));
        if let Some(target) = target
            && target != module
            && !module.starts_with(&format!("{target}::"))
            && !target.is_empty()
        {
            out.insert(target);
        }
    }
    out
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, String>) {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for file in &files {
        let (module, text) = (module_of(file), code(file));
        edges.insert(module.clone(), imports(&module, &text, &modules));
        texts.insert(module, text);
    }
    (edges, texts)
}

/// A cycle through `start`, if any, by depth-first search.
fn cycle_from(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn src_has_no_import_cycle() {
    let (edges, _) = graph();
    assert!(edges.len() > 40, "the walk found the modules: {:?}", edges.keys());
    assert!(
        edges["core::request"].contains("policy"),
        "the walk resolves imports: {:?}",
        edges["core::request"]
    );
    let cycles: Vec<String> =
        edges.keys().filter_map(|m| cycle_from(m, &edges)).map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_model_and_the_policy_are_pure() {
    let (edges, texts) = graph();
    let forbidden =
        regex::Regex::new(r"\b(k8s_openapi|kube|tonic|aws_\w+|tokio\w*|hyper|axum)::").expect("regex");
    for (module, text) in &texts {
        let pure = ["model", "policy"].iter().any(|p| module == p || module.starts_with(&format!("{p}::")));
        if !pure {
            continue;
        }
        assert!(
            !forbidden.is_match(text),
            "{module} imports I/O: {:?}",
            forbidden.find(text).map(|m| m.as_str())
        );
        for target in &edges[module] {
            let inside =
                ["model", "policy"].iter().any(|p| target == p || target.starts_with(&format!("{p}::")));
            assert!(inside, "{module} depends on {target}, outside the pure core");
        }
    }
    assert!(edges["policy"].contains("model"), "policy builds on the model");
}

#[test]
fn both_modes_sit_on_the_core_and_only_the_agents_builders_reach_the_agent() {
    let (edges, _) = graph();
    let inside = |module: &str, root: &str| module == root || module.starts_with(&format!("{root}::"));
    for (module, targets) in &edges {
        for target in targets {
            if inside(module, "kube2iam") {
                assert!(!inside(target, "server"), "{module} imports {target}: kube2iam mode sits on core/");
            }
            // The fuzz harness is compiled for unit tests and cargo-fuzz only, not into the library.
            let builders = ["agent", "kube2iam", "cli", "fuzz", "fuzz_request", "fuzz_tests"];
            if inside(target, "agent") && !builders.iter().any(|b| inside(module, b)) {
                panic!("{module} imports {target}: only the agent's builders may (listener/ is shared)");
            }
        }
    }
    assert!(edges["kube2iam"].contains("core") && edges["server"].contains("core"), "{edges:?}");
    assert!(edges["metrics"].contains("listener") && edges["webhook::serve"].contains("listener"));
}
