use std::time::{Duration, SystemTime};

use super::*;

fn exposition() -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &METRICS.registry).unwrap();
    out
}

#[test]
fn events_are_counted_under_closed_labels() {
    rpc("Get", tonic::Code::PermissionDenied, Duration::from_millis(3));
    decision("read", "deny");
    handshake_refused(Refusal::Timeout);
    let out = exposition();
    assert!(
        out.contains("secretgate_requests_total{method=\"Get\",code=\"PERMISSION_DENIED\"}"),
        "{out}"
    );
    assert!(
        out.contains("secretgate_authz_decisions_total{action=\"read\",result=\"deny\"}"),
        "{out}"
    );
    assert!(out.contains("secretgate_handshakes_refused_total{reason=\"timeout\"}"), "{out}");
    assert!(
        out.contains("secretgate_request_duration_seconds_bucket{le=\"0.0064\",method=\"Get\"}")
            || out.contains(
                "secretgate_request_duration_seconds_bucket{method=\"Get\",le=\"0.0064\"}"
            ),
        "{out}"
    );
}

#[test]
fn open_connections_give_the_soonest_expiry_and_are_forgotten_when_closed() {
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let near = SystemTime::UNIX_EPOCH + Duration::from_secs(3_000_000_000);
    let before = connections();
    let a = OpenConnection::new(far);
    let b = OpenConnection::new(near);
    let c = OpenConnection::new(near);
    let (open, soonest) = connections();
    assert_eq!(open, before.0 + 3);
    assert!(soonest.is_some_and(|s| s <= 3_000_000_000));
    drop((b, c));
    assert_eq!(connections().0, before.0 + 1);
    drop(a);
    assert_eq!(connections().0, before.0);
}
