//! The generated gRPC types of `proto/secretgate/v1`, plus hand-written `Debug` for the
//! messages that carry secret values: they print the value's length, never its bytes.

#![allow(missing_docs, clippy::all)]

use std::fmt;

/// `secretgate.v1`: the public API.
pub mod v1 {
    tonic::include_proto!("secretgate.v1");
}

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("secretgate_descriptor");

impl fmt::Debug for v1::PutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutRequest")
            .field("path", &self.path)
            .field("value", &format_args!("<{} bytes redacted>", self.value.len()))
            .field("expected_version", &self.expected_version)
            .finish()
    }
}

impl fmt::Debug for v1::GetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResponse")
            .field("path", &self.path)
            .field("value", &format_args!("<{} bytes redacted>", self.value.len()))
            .field("version", &self.version)
            .field("created_time", &self.created_time)
            .field("current_version", &self.current_version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn debug_output_redacts_secret_values() {
        let put =
            PutRequest { path: "/a".into(), value: b"hunter2".to_vec(), expected_version: None };
        let get = GetResponse { value: b"hunter2".to_vec(), ..Default::default() };
        for text in [format!("{put:?}"), format!("{get:?}")] {
            assert!(!text.contains("hunter2") && !text.contains("104, 117"), "{text}");
            assert!(text.contains("7 bytes redacted"), "{text}");
        }
    }
}
