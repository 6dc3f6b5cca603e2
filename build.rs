//! Compiles the gRPC contracts with protox, so that no `protoc` is needed on the build machine:
//! kiam's `KiamService` (wire-compatible with kiam v4, `proto/kiam/`) and kiam-rs's own services
//! (`proto/kiamrs/`: `Debug`, `NodeView`, ...). Every `.proto` file under those folders is compiled.
//! (No file imports another, so the two sets compile apart.)

use std::path::Path;

fn protos(dir: &Path, root: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            protos(&path, root, out)?;
        } else if path.extension().is_some_and(|e| e == "proto")
            && let Ok(relative) = path.strip_prefix(root)
        {
            out.push(relative.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    println!("cargo:rerun-if-changed=proto");
    let mut files = Vec::new();
    protos(root, root, &mut files)?;
    files.sort();
    for proto in &files {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    // kiam-rs's own services (the node view's long-lived streams among them) use `pb::Compact`,
    // prost's codec with smaller buffers (see there). kiam's service and the kubelet's keep
    // tonic's default codec: their calls are unary, so their buffers live for one call, and
    // kiam's `GetPodCredentials` is figure 5's hot path.
    let (own, others): (Vec<String>, Vec<String>) = files.into_iter().partition(|f| f.starts_with("kiamrs/"));
    tonic_prost_build::configure()
        .codec_path("crate::pb::Compact")
        .compile_fds(protox::compile(&own, ["proto"])?)?;
    tonic_prost_build::configure().compile_fds(protox::compile(&others, ["proto"])?)?;
    Ok(())
}
