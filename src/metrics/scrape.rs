//! The gateway's state, read at each scrape (see the module docs of [`super`]).

use std::{sync::Arc, time::SystemTime};

use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::{audit::AuditLog, server::Reloads, store::Store};

/// What a scrape reads from a running gateway.
#[derive(Clone)]
pub struct Sources {
    /// The audit log (its fail-closed state).
    pub audit: AuditLog,
    /// The store (cache state, etcd members).
    pub store: Arc<dyn Store>,
    /// The keyring, policy, server certificate and client trust in force.
    pub(crate) reloads: Arc<Reloads>,
}

type Labels = Vec<(&'static str, String)>;

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// An info metric the Prometheus text format knows too (promtool rejects the OpenMetrics
/// `info` type): a gauge of 1 whose labels are the information.
fn info(labels: Labels) -> Family<Labels, Gauge> {
    let family: Family<Labels, Gauge> = Family::default();
    family.get_or_create(&labels).set(1);
    family
}

fn gauge(value: i64) -> Gauge {
    let g = Gauge::default();
    g.set(value);
    g
}

impl Sources {
    /// The exposition: the process's event metrics, then this gateway's state.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode_registry(&mut out, &super::METRICS.registry)?;
        encode_registry(&mut out, &self.state())?;
        encode_eof(&mut out)?;
        Ok(out)
    }

    fn state(&self) -> Registry {
        let mut r = Registry::with_prefix("secretgate");
        let failing = self.audit.failure().is_some();
        r.register(
            "audit_fail_closed",
            "1 while the audit log cannot be written and requests are refused",
            gauge(i64::from(failing)),
        );
        r.register(
            "audit_enabled",
            "1 when requests are audited (0 only in benchmarks: audit.enabled = false)",
            gauge(i64::from(self.audit.log_id().is_some())),
        );

        let status = self.store.status();
        r.register(
            "store_info",
            "The store backend",
            info(vec![("backend", status.backend.to_owned())]),
        );
        let cache: Family<Labels, Gauge> = Family::default();
        for state in ["serving", "filling", "over budget", "off"] {
            let label = vec![("state", state.replace(' ', "_"))];
            cache.get_or_create(&label).set(i64::from(status.cache == state));
        }
        r.register(
            "store_cache_state",
            "The etcd read cache's state: 1 for the one it is in (over_budget: degraded, reads go to etcd)",
            cache,
        );
        r.register(
            "store_cache_entries",
            "Keys held by the read cache",
            gauge(status.entries as i64),
        );
        r.register_with_unit(
            "store_cache",
            "Bytes the read cache counts against its budget",
            Unit::Bytes,
            gauge(status.bytes as i64),
        );
        r.register_with_unit(
            "store_cache_budget",
            "The read cache's budget (store.cache_max_mib)",
            Unit::Bytes,
            gauge(status.max_bytes as i64),
        );
        let hits = Counter::<u64>::default();
        hits.inc_by(status.hits);
        r.register("store_cache_hits", "Reads answered from the cache", hits);
        let members: Family<Labels, Gauge> = Family::default();
        for (url, up) in &status.members {
            members.get_or_create(&vec![("member", url.clone())]).set(i64::from(*up));
        }
        r.register(
            "etcd_member_up",
            "1 if the gateway's last request to this etcd member answered",
            members,
        );
        let leader: Family<Labels, Gauge> = Family::default();
        for (url, _) in &status.members {
            let leads = status.leader.as_ref() == Some(url);
            leader.get_or_create(&vec![("member", url.clone())]).set(i64::from(leads));
        }
        r.register(
            "etcd_member_leader",
            "1 for the etcd member the gateway knows as the leader (its requests go there)",
            leader,
        );

        let reloads = &self.reloads;
        let keys = reloads.keys.current();
        r.register(
            "keyring_info",
            "The keyring in force",
            info(vec![
                ("version", keys.version().to_owned()),
                ("primary", keys.primary().id.to_string()),
            ]),
        );
        let policy = reloads.policy.current();
        r.register(
            "policy_info",
            "The policy in force",
            info(vec![("version", policy.version().to_owned())]),
        );
        r.register(
            "policy_rules",
            "Rules of the policy in force",
            gauge(policy.rule_count() as i64),
        );
        let degraded: Family<Labels, Gauge> = Family::default();
        for (what, _, refused) in reloads.status() {
            let label = vec![("what", what.replace(' ', "_"))];
            degraded.get_or_create(&label).set(i64::from(refused.is_some()));
        }
        r.register(
            "reload_refused",
            "1 while the newest files of this were refused and the last good version serves (degraded, still serving)",
            degraded,
        );

        if let Some(expires) = reloads.server_cert.current().expires() {
            r.register_with_unit(
                "server_cert_expiry_timestamp",
                "When the server certificate in force expires (Unix time)",
                Unit::Seconds,
                gauge(unix(expires)),
            );
        }
        if let Some(next) = reloads.trust.current().crl_next_update() {
            r.register_with_unit(
                "client_crl_next_update_timestamp",
                "The earliest next update of the client CRLs in force (Unix time): past it, their CA's clients are refused",
                Unit::Seconds,
                gauge(unix(next)),
            );
        }
        r.register("watch_streams", "Secrets.Watch streams open", gauge(super::watch_streams()));
        let (open, soonest) = super::connections();
        r.register(
            "open_connections",
            "Client connections open (handshake completed)",
            gauge(open),
        );
        if let Some(soonest) = soonest {
            r.register_with_unit(
                "client_cert_soonest_expiry_timestamp",
                "The soonest expiry among the client certificates of open connections (Unix time)",
                Unit::Seconds,
                gauge(soonest),
            );
        }
        r
    }
}
