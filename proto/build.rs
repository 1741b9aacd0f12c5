fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the vendored protoc so a fresh machine needs no system protobuf-compiler.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Events serialize to JSON for the SIEM feed (docs/audit-log.md).
        .type_attribute(".custos.v1", "#[derive(serde::Serialize)]")
        .type_attribute(".custos.v1", "#[serde(rename_all = \"snake_case\")]")
        .compile_protos(
            &[
                "proto/custos/v1/events.proto",
                "proto/custos/v1/controlplane.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
