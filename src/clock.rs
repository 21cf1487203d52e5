//! Wall-clock times as the gateway writes them: RFC 3339, UTC.

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

/// The current time with milliseconds (audit records): `2026-12-02T00:56:31.123Z`.
pub fn now_rfc3339_millis() -> String {
    const FORMAT: &[FormatItem<'static>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::now_utc().format(FORMAT).unwrap_or_default()
}

/// The current time to the second (keyring entries): `2026-12-02T00:56:31Z`.
pub fn now_rfc3339_secs() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_as_rfc3339() {
        use time::format_description::well_known::Rfc3339;
        let ms = now_rfc3339_millis();
        let s = now_rfc3339_secs();
        assert_eq!(ms.len(), "2026-12-02T00:56:31.123Z".len(), "{ms}");
        assert_eq!(s.len(), "2026-12-02T00:56:31Z".len(), "{s}");
        OffsetDateTime::parse(&ms, &Rfc3339).unwrap();
        OffsetDateTime::parse(&s, &Rfc3339).unwrap();
    }
}
