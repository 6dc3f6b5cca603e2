//! The release workflow (issue 26), `.github/workflows/release.yml`, which a maintainer runs by
//! pushing a tag and which nothing here can run: linted with actionlint (expressions, action
//! inputs, job wiring, and its shell steps with shellcheck where installed), validated against
//! GitHub's workflow schema (check-jsonschema's bundled copy: no network), and read for what a
//! release must do: the image for amd64 and arm64, each built natively from the Dockerfile, one
//! tag over both, an SBOM, keyless signatures of the image and the chart, the chart pushed as an
//! OCI artifact.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::moto::venv_bin;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn workflow_path() -> PathBuf {
    root().join(".github/workflows/release.yml")
}

/// Runs a venv tool on `file`; its exit status and output.
fn tool(program: &str, args: &[&str], file: &Path) -> (bool, String) {
    let out = Command::new(venv_bin(program)).args(args).arg(file).output().expect("run the tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn actionlint(file: &Path) -> (bool, String) {
    tool("actionlint", &["-no-color"], file)
}

fn schema(file: &Path) -> (bool, String) {
    tool("check-jsonschema", &["--builtin-schema", "vendor.github-workflows"], file)
}

/// The workflow as JSON, every scalar a string (YAML 1.1 would read the key `on` as a boolean).
fn workflow(text: &str) -> Value {
    let code = "import json, sys, yaml; print(json.dumps(yaml.load(sys.stdin, Loader=yaml.BaseLoader)))";
    let mut child = Command::new(venv_bin("python"))
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("python runs");
    assert!(out.status.success(), "the workflow is not YAML");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Every step of a job, with its `run` script or `uses` action and `with` inputs.
fn steps<'a>(doc: &'a Value, job: &str) -> &'a Vec<Value> {
    doc["jobs"][job]["steps"].as_array().unwrap_or_else(|| panic!("job {job} has steps"))
}

fn runs(doc: &Value, job: &str) -> String {
    steps(doc, job).iter().filter_map(|s| s["run"].as_str()).collect::<Vec<_>>().join("\n")
}

fn step_using<'a>(doc: &'a Value, job: &str, action: &str) -> &'a Value {
    steps(doc, job)
        .iter()
        .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(&format!("{action}@"))))
        .unwrap_or_else(|| panic!("job {job} uses no {action}"))
}

#[test]
fn release_workflow_lints_validates_and_publishes_both_arches_the_chart_sbom_and_signatures() {
    let path = workflow_path();
    let text = std::fs::read_to_string(&path).expect("the release workflow exists");
    let (ok, out) = actionlint(&path);
    assert!(ok, "actionlint:\n{out}");
    let (ok, out) = schema(&path);
    assert!(ok, "check-jsonschema:\n{out}");

    // The checkers do check: a broken copy fails each of them.
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("broken.yml");
    std::fs::write(&broken, text.replace("steps.index.outputs.digest", "steps.nowhere.outputs.digest"))
        .expect("write");
    let (ok, out) = actionlint(&broken);
    assert!(!ok && out.contains("nowhere"), "actionlint misses an undefined step: {out}");
    std::fs::write(&broken, text.replace("runs-on: ubuntu-24.04\n", "runs_on: ubuntu-24.04\n"))
        .expect("write");
    assert!(!schema(&broken).0, "the schema misses a job without runs-on");

    let doc = workflow(&text);
    // Only tags publish.
    let push = &doc["on"]["push"];
    assert!(push["tags"].as_array().is_some_and(|t| !t.is_empty()) && push["branches"].is_null(), "{push}");
    assert_eq!(doc["permissions"], serde_json::json!({"contents": "read"}), "least privilege by default");

    // Every action pinned to a major version at least.
    for job in doc["jobs"].as_object().expect("jobs").keys() {
        for step in steps(&doc, job) {
            if let Some(uses) = step["uses"].as_str() {
                let (_, pin) = uses.split_once('@').unwrap_or_else(|| panic!("{uses}: not pinned"));
                let major = pin
                    .strip_prefix('v')
                    .is_some_and(|v| v.split('.').next().is_some_and(|m| m.parse::<u32>().is_ok()));
                assert!(major || (pin.len() == 40 && pin.chars().all(|c| c.is_ascii_hexdigit())), "{uses}");
            }
        }
    }

    // Both architectures, each on a runner of its own, from the one Dockerfile.
    let image = &doc["jobs"]["image"];
    let legs = image["strategy"]["matrix"]["include"].as_array().expect("a matrix");
    let mut platforms: Vec<(&str, &str)> = legs
        .iter()
        .map(|l| (l["platform"].as_str().unwrap_or(""), l["runner"].as_str().unwrap_or("")))
        .collect();
    platforms.sort();
    assert_eq!(platforms, [("linux/amd64", "ubuntu-24.04"), ("linux/arm64", "ubuntu-24.04-arm")]);
    assert_eq!(image["runs-on"], "${{ matrix.runner }}");
    // The binary in Debian 12 (the image's base, so its glibc), at the path the Dockerfile copies.
    assert!(doc["env"]["BUILD_IMAGE"].as_str().is_some_and(|i| i.ends_with("debian:bookworm")));
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("FROM docker.io/library/debian:bookworm-slim"));
    assert!(dockerfile.contains("COPY target/release/kiam /kiam"));
    assert!(runs(&doc, "image").contains("cargo build --release --locked --bin kiam"));
    let build = &step_using(&doc, "image", "docker/build-push-action")["with"];
    assert_eq!(
        (build["file"].as_str(), build["platforms"].as_str()),
        (Some("Dockerfile"), Some("${{ matrix.platform }}"))
    );
    assert_eq!(build["sbom"], "true", "an SBOM attestation");
    let outputs = build["outputs"].as_str().unwrap_or("");
    assert!(outputs.contains("name=${{ steps.names.outputs.image }},push-by-digest=true"), "{outputs}");
    assert!(runs(&doc, "image").contains("echo \"image=ghcr.io/${GITHUB_REPOSITORY_OWNER,,}/kiam-rs\""));

    // One tag over both digests, signed; the SBOM attested; the chart pushed as OCI and signed.
    let publish = &doc["jobs"]["publish"];
    assert_eq!(publish["needs"], "image");
    assert_eq!(publish["permissions"]["id-token"], "write", "keyless signing");
    assert!(doc["jobs"]["image"]["permissions"]["id-token"].is_null(), "no OIDC token where it is not used");
    let script = runs(&doc, "publish");
    assert!(script.contains("docker buildx imagetools create"), "{script}");
    assert!(script.contains("test \"${#sources[@]}\" -eq 2"), "both platforms joined");
    step_using(&doc, "publish", "sigstore/cosign-installer");
    step_using(&doc, "publish", "anchore/sbom-action");
    assert!(script.contains("cosign sign --yes \"$IMAGE@$DIGEST\""), "the image signed by digest");
    assert!(script.contains("cosign attest --yes --type spdxjson"), "the SBOM attested");
    assert!(script.contains("helm package deploy/helm/kiam-rs"), "{script}");
    assert!(script.contains("helm push \"dist/kiam-rs-$VERSION.tgz\" \"oci://$CHARTS\""), "{script}");
    assert!(script.contains("cosign sign --yes \"$CHARTS/kiam-rs@$DIGEST\""), "the chart signed by digest");
    let chart = std::fs::read_to_string(root().join("deploy/helm/kiam-rs/Chart.yaml")).expect("Chart.yaml");
    assert!(chart.contains("\nname: kiam-rs\n"), "the package name the push step names");
}
