//! Generates the gRPC code from `proto/kvraft.proto` with the `protoc` shipped by
//! `protoc-bin-vendored`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/kvraft.proto");
    tonic_prost_build::configure()
        .bytes(".kvraft")
        .compile_protos(&["proto/kvraft.proto"], &["proto"])?;
    Ok(())
}
