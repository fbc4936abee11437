//! Generates the Terraform plugin protocol (tfplugin6) and go-plugin controller server code;
//! protoc comes vendored, no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; tonic-prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let protos = ["proto/tfplugin6.proto", "proto/grpc_controller.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(false)
        // RPCs we do not implement answer `Unimplemented`, which Terraform tolerates.
        .generate_default_stubs(true)
        // DynamicValue carries secrets (master secret, kubeconfig): its Debug is hand-written.
        .skip_debug(["tfplugin6.DynamicValue"])
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
