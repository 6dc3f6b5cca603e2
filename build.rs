//! Compiles the gRPC contracts with protox, so that no `protoc` is needed on the build machine:
//! kiam's `KiamService` (wire-compatible with kiam v4) and kiam-rs's own `Debug`, `NodeView` and
//! `PodTokens` services.

const PROTOS: [&str; 4] =
    ["kiam/service.proto", "kiamrs/debug.proto", "kiamrs/node.proto", "kiamrs/token.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
