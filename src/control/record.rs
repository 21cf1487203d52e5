//! The stored form of a control object (a policy version; later the keyring and client
//! trust): a header naming the schema, the object's kind and version number and a MAC, then
//! the body.
//!
//! ```text
//! secretgate-control 1 policy 7 <64 hex digits: HMAC-SHA256>\n
//! <body: JSON>
//! ```
//!
//! The MAC is keyed by a key derived from the KEK and covers the schema, the kind, the
//! version and the exact body bytes as stored (it is checked before the body is parsed), so
//! a record cannot be forged without the KEK, nor moved to another version number or kind.
//! An older genuine record is still genuine: replicas refuse to go back to a version lower
//! than the highest they accepted (see [`super::Follower`]).

use super::Kek;

/// The record schema this gateway writes and reads.
pub const SCHEMA: u32 = 1;
const MAGIC: &str = "secretgate-control";

/// Why a stored record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not a control record.
    #[error("not a control record")]
    Format,
    /// Written by a gateway with a newer record schema.
    #[error("record schema {0} is newer than this gateway's ({SCHEMA}); upgrade this replica")]
    Schema(u32),
    /// The header names another kind or version than the key it is stored under.
    #[error("the record says {kind} version {version}, but it is stored as another")]
    Moved {
        /// The kind in the header.
        kind: String,
        /// The version in the header.
        version: u64,
    },
    /// The MAC does not verify: forged, altered, or sealed under another KEK.
    #[error("not authenticated by this gateway's KEK (forged, altered, or another KEK's)")]
    Mac,
}

/// Seals `body` as version `version` of `kind`.
pub fn seal(kek: &Kek, kind: &str, version: u64, body: &[u8]) -> Vec<u8> {
    let (schema, number) = (SCHEMA.to_be_bytes(), version.to_be_bytes());
    let tag = kek.mac(&[MAGIC.as_bytes(), &schema, kind.as_bytes(), &number, body]);
    let mut out = format!("{MAGIC} {SCHEMA} {kind} {version} {}\n", hex::encode(tag)).into_bytes();
    out.extend_from_slice(body);
    out
}

/// Checks that `bytes` is version `version` of `kind`, sealed under `kek`, and returns its body.
pub fn open<'a>(
    kek: &Kek,
    kind: &str,
    version: u64,
    bytes: &'a [u8],
) -> Result<&'a [u8], RecordError> {
    let newline = bytes.iter().position(|b| *b == b'\n').ok_or(RecordError::Format)?;
    let (header, body) = (&bytes[..newline], &bytes[newline + 1..]);
    let header = std::str::from_utf8(header).map_err(|_| RecordError::Format)?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, schema, their_kind, their_version, tag] = fields.as_slice() else {
        return Err(RecordError::Format);
    };
    if *magic != MAGIC {
        return Err(RecordError::Format);
    }
    let schema: u32 = schema.parse().map_err(|_| RecordError::Format)?;
    if schema != SCHEMA {
        return Err(RecordError::Schema(schema));
    }
    let their_version: u64 = their_version.parse().map_err(|_| RecordError::Format)?;
    let tag = hex::decode(tag).map_err(|_| RecordError::Format)?;
    // The MAC first: nothing of an unauthenticated record is believed, not even its header.
    let (schema, number) = (SCHEMA.to_be_bytes(), their_version.to_be_bytes());
    if !kek.verify(&[MAGIC.as_bytes(), &schema, their_kind.as_bytes(), &number, body], &tag) {
        return Err(RecordError::Mac);
    }
    if *their_kind != kind || their_version != version {
        return Err(RecordError::Moved { kind: (*their_kind).to_owned(), version: their_version });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_as_itself_under_its_kek() {
        let kek = Kek::from_bytes(&[7u8; 32]);
        let sealed = seal(&kek, "policy", 3, b"{\"a\":1}");
        assert_eq!(open(&kek, "policy", 3, &sealed).unwrap(), b"{\"a\":1}");
        assert!(matches!(open(&kek, "policy", 4, &sealed), Err(RecordError::Moved { .. })));
        assert!(matches!(open(&kek, "keyring", 3, &sealed), Err(RecordError::Moved { .. })));
        assert_eq!(open(&Kek::from_bytes(&[8u8; 32]), "policy", 3, &sealed), Err(RecordError::Mac));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(open(&kek, "policy", 3, &altered), Err(RecordError::Mac));
        // Renumbering the header (to pass a replayed record off as a newer version) breaks it.
        let text = String::from_utf8(sealed.clone()).unwrap();
        let renumbered = text.replacen(" policy 3 ", " policy 9 ", 1);
        assert_eq!(open(&kek, "policy", 9, renumbered.as_bytes()), Err(RecordError::Mac));
        let newer = text.replacen("secretgate-control 1 ", "secretgate-control 2 ", 1);
        assert_eq!(open(&kek, "policy", 3, newer.as_bytes()), Err(RecordError::Schema(2)));
        assert_eq!(open(&kek, "policy", 3, b"garbage"), Err(RecordError::Format));
    }
}
