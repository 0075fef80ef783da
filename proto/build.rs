//! Compiles `proto/fleet/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building
//! the workspace never needs a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let files = [
        "fleet/v1/device.proto",
        "fleet/v1/update.proto",
        "fleet/v1/fleet.proto",
        "fleet/v1/trust.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    prost_build::Config::new()
        // Keep the `.proto` comments on the generated items.
        .disable_comments(Vec::<String>::new())
        .compile_fds(descriptors)?;
    Ok(())
}
