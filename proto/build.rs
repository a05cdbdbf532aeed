//! Generates the gRPC code from `proto/kvraft.proto` (and the client of etcd's KV API subset in
//! `proto/etcd_kv.proto`, for the bench) with the `protoc` shipped by
//! `protoc-bin-vendored`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/kvraft.proto");
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    tonic_prost_build::configure()
        .bytes(".kvraft")
        .compile_protos(&["proto/kvraft.proto"], &["proto"])?;
    // The etcd client subset for `bench --etcd` (no server side is needed).
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    Ok(())
}
