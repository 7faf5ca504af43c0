//! Generates the gRPC code of `proto/weight_sync.proto` with the vendored
//! `protoc`, so that no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // Chunk payloads decode as `Bytes` slices of the received buffer.
        .bytes(".tandem.weight_sync.v1.TensorChunk.data")
        .compile_protos(&["proto/weight_sync.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/weight_sync.proto");
    Ok(())
}
