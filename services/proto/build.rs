//! Generates the tonic code for every protocol; protoc comes vendored, no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; tonic-prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let protos = ["init", "join", "keyservice", "verify", "recover", "kmsv2"]
        .map(|p| format!("proto/{p}.proto"));
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto".to_string()])?;
    Ok(())
}
