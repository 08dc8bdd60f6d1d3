//! Compiles proto/ with a vendored protoc, so the build needs nothing installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "agentgate/common/v1/common.proto",
        "agentgate/audit/v1/audit.proto",
        "agentgate/authz/v1/authz.proto",
        "agentgate/approvals/v1/approvals.proto",
    ]
    .map(|f| root.join(f));
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(config, &files, &[root.clone(), include])?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
