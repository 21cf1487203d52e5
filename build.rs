//! Compiles the public gRPC API (`proto/secretgate/v1`) and records its descriptor set for
//! server reflection. Messages that carry secret values get a hand-written, redacting
//! `Debug` (in `src/proto.rs`) instead of prost's derived one.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("secretgate_descriptor.bin"))
        .skip_debug([".secretgate.v1.PutRequest", ".secretgate.v1.GetResponse"])
        .compile_protos(
            &[
                "proto/secretgate/v1/secrets.proto",
                "proto/secretgate/v1/admin.proto",
                "proto/secretgate/v1/control.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
