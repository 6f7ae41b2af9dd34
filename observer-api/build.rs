//! Generates the protobuf messages and tonic client/server from `proto/observer.proto`
//! (needs `protoc` on the PATH, or `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/observer.proto");
    tonic_prost_build::configure().compile_protos(&["proto/observer.proto"], &["proto"])?;
    Ok(())
}
