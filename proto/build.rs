//! Compiles every .proto of the system with the vendored protoc, so a fresh
//! machine needs nothing but cargo, and writes one descriptor set for
//! server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "saga/v1/order.proto",
    "saga/v1/admin.proto",
    "inventory/v1/inventory.proto",
    "payment/v1/payment.proto",
    "fulfillment/v1/fulfillment.proto",
    "fault/v1/fault.proto",
    "google/rpc/code.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("saga_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
