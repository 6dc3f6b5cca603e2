//! The fuzz smoke of the normal test run: every file of each target's corpus, then a bounded
//! number of generated inputs per target (proptest, shrinking any failure to a small input).
//! The long runs are `scripts/fuzz`.

use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

/// Generated inputs per target in the smoke: a few seconds for all of them together.
const CASES: u32 = 2000;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_corpus_file_passes_its_target() {
    for (name, target) in TARGETS {
        let files = corpus(name);
        assert!(!files.is_empty(), "no corpus for {name}");
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name}: {} fails", file.display());
        }
    }
}

/// Bytes biased towards what the targets parse: path characters, JSON, token characters.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        "[/a-zA-Z0-9._%\\\\-]{0,64}".prop_map(String::into_bytes),
        "(/latest|/2021-01-03|/)(/meta-data|/dynamic|/META-DATA|/user-data)?(/iam|/instance-identity|/identity-credentials)?(/[a-z0-9.%-]{0,12}){0,3}"
            .prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_paths(data in bytes()) { paths(&data) }

    #[test]
    fn fuzz_request(
        setup in any::<u8>(),
        method in prop_oneof![6 => Just("GET".to_string()), 1 => Just("HEAD".to_string()), 1 => Just("PUT".to_string()), 1 => "[A-Za-z\\x00]{1,8}"],
        path in prop_oneof![
            1 => bytes(),
            2 => "/latest/meta-data/iam/(security-credentials(-extended)?/?(alpha|beta)?|info)".prop_map(String::into_bytes),
            1 => Just(b"/v1/credentials".to_vec()),
        ],
        query in prop_oneof![Just(String::new()), "\\?ip=10\\.0\\.0\\.[12]", "\\?[a-z=&%.0-9]{0,12}"],
        headers in proptest::collection::vec(prop_oneof![
            3 => "authorization: (Bearer )?token-(alpha|beta|[a-z]{0,6})",
            1 => "authorization: [ -~]{0,24}",
            1 => "x-aws-ec2-metadata-token(-ttl-seconds)?: [ -~]{0,24}",
            2 => "(x-forwarded-for|host|connection): [ -~]{0,16}",
            1 => "[!-~]{1,12}: [\\x00-\\xff]{0,12}",
        ], 0..3),
        raw in proptest::option::weighted(0.1, proptest::collection::vec(any::<u8>(), 0..128)),
    ) {
        let mut data = vec![setup];
        match raw {
            Some(raw) => data.extend(raw),
            None => {
                data.extend(method.into_bytes());
                data.push(b' ');
                data.extend(path);
                data.extend(query.into_bytes());
                for header in headers {
                    data.push(b'\n');
                    data.extend(header.into_bytes());
                }
            }
        }
        request(&data)
    }

    #[test]
    fn fuzz_token(data in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..96),
        proptest::collection::vec(any::<u8>(), 1..10).prop_map(|mut e| { e.insert(0, 0); e }),
    ]) { token(&data) }

    #[test]
    fn fuzz_duration(text in "[+-]?([0-9.]{0,6}(ns|us|µs|ms|s|m|h|x)?){0,4}") { duration(text.as_bytes()) }

    #[test]
    fn fuzz_permitted(expr in "[a-z:/*.()|^$\\\\?+\\[\\]-]{0,24}", arn in "arn:aws:iam::[0-9]{0,12}:role/[a-z/-]{0,12}") {
        let mut data = expr.into_bytes();
        data.push(0);
        data.extend(arn.into_bytes());
        permitted(&data)
    }

    #[test]
    fn fuzz_pod(
        ip in proptest::option::of("[0-9a-f.:]{0,16}"),
        ips in proptest::collection::vec("[0-9a-f.: ]{0,16}", 0..4),
        role in proptest::option::of("[ a-z]{0,4}"),
        external in proptest::option::of("[ a-z]{0,4}"),
    ) {
        let mut annotations = serde_json::Map::new();
        if let Some(role) = role { annotations.insert(crate::model::ROLE_ANNOTATION.into(), role.into()); }
        if let Some(e) = external { annotations.insert(crate::model::EXTERNAL_ID_ANNOTATION.into(), e.into()); }
        let ips: Vec<serde_json::Value> = ips.into_iter().map(|ip| serde_json::json!({ "ip": ip })).collect();
        let pod = serde_json::json!({
            "metadata": { "name": "p", "annotations": annotations },
            "status": { "podIP": ip, "podIPs": ips },
        });
        crate::fuzz::pod(pod.to_string().as_bytes())
    }

    #[test]
    fn fuzz_certificate(data in proptest::collection::vec(any::<u8>(), 0..512)) { certificate(&data) }
}
