use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::text_edits::{apply_edits, edit};
use proptest::{prelude::*, test_runner::TestCaseError};

fn ring_text(keys: &[(&str, &str, &str)]) -> String {
    keys.iter()
        .map(|(id, state, secret)| {
            format!("[[keys]]\nid = \"{id}\"\nstate = \"{state}\"\ncreated = \"2026-01-01T00:00:00Z\"\nsecret = \"{secret}\"\n")
        })
        .collect()
}

fn b64(byte: u8, len: usize) -> String {
    B64.encode(vec![byte; len])
}

#[test]
fn generated_ring_round_trips_through_its_file() {
    let mut ring = Keyring::generate().unwrap();
    let second = ring.add().unwrap();
    let text = ring.to_toml();
    let back = Keyring::parse(&text).unwrap();
    assert_eq!(back.version(), ring.version());
    assert_eq!(back.primary().id, ring.primary().id);
    assert_eq!(
        back.opener(second.as_str()).unwrap().material().unwrap().bytes(),
        ring.opener(second.as_str()).unwrap().material().unwrap().bytes()
    );
}

#[test]
fn each_invalid_ring_is_refused_with_its_own_error() {
    let k = b64(1, 32);
    let cases: Vec<(String, &str)> = vec![
        ("keys = []".into(), "no keys"),
        (ring_text(&[("a", "active", &k)]), "no primary"),
        (ring_text(&[("a", "primary", &k), ("b", "primary", &k)]), "several primary keys (a, b)"),
        (ring_text(&[("a", "primary", &k), ("a", "active", &k)]), "key id a more than once"),
        (ring_text(&[("a", "primary", &b64(1, 16))]), "16 bytes"),
        (ring_text(&[("a", "primary", "not base64!")]), "not valid base64"),
        (ring_text(&[("a b", "primary", &k)]), "invalid key id"),
        (ring_text(&[("a", "boss", &k)]), "line"),
    ];
    for (text, needle) in cases {
        let err = Keyring::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn errors_and_debug_never_show_key_material() {
    let secret = b64(0x5a, 32);
    let broken =
        format!("[[keys]]\nid = \"a\"\nstate = \"primary\"\nsecret = \"{secret}\"\ncreated = 5\n");
    let err = Keyring::parse(&broken).unwrap_err().to_string();
    assert!(!err.contains(&secret), "{err}");
    let ring = Keyring::parse(&ring_text(&[("a", "primary", &secret)])).unwrap();
    let dbg = format!("{ring:?}");
    assert!(!dbg.contains(&secret) && !dbg.contains("90, 90"), "{dbg}");
}

#[test]
fn group_or_world_readable_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.toml");
    Keyring::generate().unwrap().save(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    Keyring::load(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Keyring::load(&path).unwrap_err().to_string();
    assert!(err.contains("0640") && err.contains("chmod 600"), "{err}");
}

#[test]
fn lifecycle_promote_and_retire() {
    let mut ring = Keyring::generate().unwrap();
    let a = ring.primary().id.clone();
    let b = ring.add().unwrap();
    assert!(ring.opener(b.as_str()).is_some());
    assert!(matches!(ring.retire(a.as_str()), Err(KeyringError::WrongState { .. })));
    ring.promote(b.as_str()).unwrap();
    assert_eq!(ring.primary().id, b);
    assert_eq!(ring.keys()[0].state, KeyState::Active);
    ring.retire(a.as_str()).unwrap();
    assert!(ring.opener(a.as_str()).is_none(), "retired keys are not loaded");
    let reloaded = Keyring::parse(&ring.to_toml()).unwrap();
    assert!(reloaded.opener(a.as_str()).is_none());
    assert_eq!(reloaded.keys().len(), 2, "retired keys stay in the file");
    assert!(matches!(ring.promote("nope"), Err(KeyringError::UnknownKey(_))));
}

/// What every keyring `parse` accepts must satisfy: one primary key, valid unique ids,
/// material exactly for the keys that are not retired, and its own file text parses
/// back to the same ring.
fn assert_well_formed(ring: &Keyring) -> Result<(), TestCaseError> {
    let keys = ring.keys();
    prop_assert!(!keys.is_empty());
    prop_assert_eq!(keys.iter().filter(|k| k.state == KeyState::Primary).count(), 1);
    prop_assert_eq!(ring.primary().state, KeyState::Primary);
    for (i, k) in keys.iter().enumerate() {
        prop_assert_eq!(KeyId::parse(k.id.as_str()).ok(), Some(k.id.clone()));
        prop_assert!(keys[..i].iter().all(|o| o.id != k.id), "duplicate id {}", k.id);
        prop_assert_eq!(k.material.is_some(), k.state != KeyState::Retired, "{}", k.id);
        prop_assert!(
            time::OffsetDateTime::parse(&k.created, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }
    let back = Keyring::parse(&ring.to_toml())
        .map_err(|e| TestCaseError::fail(format!("an accepted ring's own text is refused: {e}")))?;
    prop_assert_eq!(back.version(), ring.version());
    prop_assert_eq!(back.keys().len(), keys.len());
    for (a, b) in keys.iter().zip(back.keys()) {
        prop_assert_eq!((&a.id, a.state, &a.created), (&b.id, b.state, &b.created));
        prop_assert_eq!(
            a.material.as_ref().map(|m| *m.bytes()),
            b.material.as_ref().map(|m| *m.bytes())
        );
    }
    Ok(())
}

/// A ring with a key in each state, its file text, and the texts an error must never
/// show: each key's base64 and hex, and every 12-character run of its base64.
fn sample_ring() -> &'static (String, Vec<String>) {
    static RING: std::sync::OnceLock<(String, Vec<String>)> = std::sync::OnceLock::new();
    RING.get_or_init(|| {
        let mut ring = Keyring::generate().unwrap();
        let first = ring.primary().id.clone();
        let second = ring.add().unwrap();
        ring.add().unwrap();
        ring.promote(second.as_str()).unwrap();
        ring.retire(first.as_str()).unwrap();
        let states: Vec<KeyState> = ring.keys().iter().map(|k| k.state).collect();
        assert_eq!(states, [KeyState::Retired, KeyState::Primary, KeyState::Active]);
        let mut secrets = Vec::new();
        for k in ring.keys() {
            let b64 = k.encoded.to_string();
            let raw = B64.decode(&b64).unwrap();
            secrets.push(hex::encode(&raw));
            let chars: Vec<char> = b64.chars().collect();
            secrets.extend(chars.windows(12).map(|w| w.iter().collect::<String>()));
            secrets.push(b64);
        }
        (ring.to_toml().to_string(), secrets)
    })
}

fn assert_no_key_material(err: &KeyringError, secrets: &[String]) -> Result<(), TestCaseError> {
    let shown = format!("{err} {err:?}");
    for s in secrets {
        prop_assert!(!shown.contains(s.as_str()), "error shows key material {:?}: {}", s, shown);
    }
    Ok(())
}

#[test]
fn the_sample_ring_parses_and_its_errors_are_checked() {
    let (text, secrets) = sample_ring();
    assert_well_formed(&Keyring::parse(text).unwrap()).unwrap();
    // The leak check can fail: an error that did show a key would be caught.
    let leak = KeyringError::Parse(format!("line 3: near {}", &secrets[5]));
    assert!(assert_no_key_material(&leak, secrets).is_err());
}

#[test]
fn parse_errors_at_the_start_of_a_line_name_that_line() {
    // Once reported as line 1 (lines before an error at column 1 were counted).
    let err = Keyring::parse("keys = []\nbogus = 1\n").unwrap_err().to_string();
    assert!(err.contains("line 2:"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn key_id_parse_accepts_exactly_the_id_charset(
        s in prop_oneof![any::<String>(), "[A-Za-z0-9._-]{0,70}", "[A-Za-z0-9._ -]{0,8}"],
    ) {
        let charset_ok =
            s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        match KeyId::parse(&s) {
            Ok(id) => {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!((1..=MAX_ID_LEN).contains(&s.len()) && charset_ok, "{:?}", s);
            }
            Err(KeyringError::BadId(shown)) => {
                prop_assert!(s.is_empty() || s.len() > MAX_ID_LEN || !charset_ok, "{:?}", s);
                prop_assert_eq!(shown, s.chars().take(80).collect::<String>());
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn key_state_parses_only_the_three_names(
        state in prop_oneof![
            any::<String>(),
            "(primary|active|retired|Primary|ACTIVE| retired)",
            "[a-z\"\\\\]{0,10}",
        ],
    ) {
        let (text, _) = sample_ring();
        // The third key is active: give it `state` instead, written as a TOML string.
        let quoted = toml::Value::String(state.clone()).to_string();
        let active = "state = \"active\"";
        let at = text.rfind(active).unwrap();
        let edited = format!("{}state = {quoted}{}", &text[..at], &text[at + active.len()..]);
        match Keyring::parse(&edited) {
            Ok(ring) => {
                prop_assert!(state == "active" || state == "retired", "{:?} accepted", state);
                prop_assert_eq!(format!("{:?}", ring.keys()[2].state).to_lowercase(), state);
                assert_well_formed(&ring)?;
            }
            Err(KeyringError::SeveralPrimaries(ids)) => {
                prop_assert_eq!(state, "primary", "{}", ids);
            }
            Err(e) => {
                let named = ["active", "retired", "primary"].contains(&state.as_str());
                prop_assert!(!named, "{}", e);
                let at_line = matches!(e, KeyringError::Parse(ref m) if m.starts_with("line "));
                prop_assert!(at_line, "{}", e);
            }
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_text(
        text in prop_oneof![any::<String>(), "[\\[\\]a-z=\" \n0-9A-Za-z+/#.:-]{0,300}"],
    ) {
        match Keyring::parse(&text) {
            Ok(ring) => assert_well_formed(&ring)?,
            Err(KeyringError::Parse(m)) => {
                // "line N: ..." with N a line of the text (the last one may be empty).
                if let Some(n) = m.strip_prefix("line ").and_then(|r| r.split(':').next()) {
                    let n: usize = n.parse().map_err(|_| TestCaseError::fail(m.clone()))?;
                    prop_assert!((1..=text.matches('\n').count() + 1).contains(&n), "{}", m);
                }
                prop_assert!(!m.chars().any(|c| c == '\n' || c == '\r'), "{:?}", m);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn edited_keyring_files_are_refused_without_showing_keys_or_are_well_formed(
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let (text, secrets) = sample_ring();
        let edited = apply_edits(text, &edits);
        match Keyring::parse(&edited) {
            Ok(ring) => assert_well_formed(&ring)?,
            Err(e) => assert_no_key_material(&e, secrets)?,
        }
    }
}
