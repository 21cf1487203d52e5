//! Client commands: `put`, `get`, `ls`, `rm`, `versions`, over mTLS to a gateway.

use crate::text::escaped;
use std::{
    io::{IsTerminal, Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::{ClientArgs, Output};
use crate::proto::v1::{self, secrets_client::SecretsClient};

/// Largest response the CLI accepts.
const MAX_RESPONSE_BYTES: usize = 17 << 20;

/// Connects to the gateway's `Secrets` service.
async fn connect(args: &ClientArgs) -> anyhow::Result<SecretsClient<Channel>> {
    // Values may be up to 16 MiB (the largest `limits.max_value_bytes`), above tonic's 4 MiB.
    Ok(SecretsClient::new(channel(args).await?).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// Opens a channel to the gateway with the client certificate from `args`.
pub(super) async fn channel(args: &ClientArgs) -> anyhow::Result<Channel> {
    let addr = normalize_addr(&args.addr)?;
    let ca = read(&args.ca, "CA certificate")?;
    let cert = read(&args.cert, "client certificate")?;
    let key = Zeroizing::new(read(&args.key, "client private key")?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key.as_slice()));
    let channel = Endpoint::from_shared(addr.clone())
        .with_context(|| format!("bad address {addr}"))?
        .tls_config(tls)
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(args.timeout))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(channel)
}

fn normalize_addr(addr: &str) -> anyhow::Result<String> {
    if addr.starts_with("http://") {
        bail!("{addr}: plaintext http is not supported; secretgate speaks only mTLS (https://)");
    }
    Ok(if addr.starts_with("https://") { addr.to_owned() } else { format!("https://{addr}") })
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!("cannot read {what} {} (run `secretgate dev` for a development PKI, or set --ca/--cert/--key)", path.display())
    })
}

/// A failed RPC as a one-line error: code and the gateway's message, plus the transport
/// cause when there is one (e.g. a TLS alert).
pub(super) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    use std::error::Error;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    anyhow!(text)
}

pub(super) async fn put(
    args: &ClientArgs,
    path: String,
    value: Option<String>,
    file: Option<PathBuf>,
    expected_version: Option<u64>,
) -> anyhow::Result<()> {
    let value = match (value, file) {
        (Some(v), None) if v == "-" => {
            let mut buf = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut buf).context("reading the value from stdin")?;
            buf
        }
        (Some(v), None) => Zeroizing::new(v.into_bytes()),
        (None, Some(f)) => Zeroizing::new(read(&f, "value file")?),
        _ => bail!("give the value as an argument, --file FILE, or - to read standard input"),
    };
    let mut client = connect(args).await?;
    let req = v1::PutRequest { path: path.clone(), value: value.to_vec(), expected_version };
    let resp = client.put(req).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => println!("wrote {path} version {}", resp.version),
        Output::Json => print_json(&json!({
            "path": path, "version": resp.version, "created_time": rfc3339(resp.created_time.as_ref()),
        })),
    }
    Ok(())
}

pub(super) async fn get(
    args: &ClientArgs,
    path: String,
    version: Option<u64>,
) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let resp = client.get(v1::GetRequest { path, version }).await.map_err(rpc_error)?.into_inner();
    let value = Zeroizing::new(resp.value.clone());
    match args.output {
        Output::Human => {
            let mut out = std::io::stdout().lock();
            if std::io::stdout().is_terminal() {
                // For a person: control bytes escaped (a value cannot drive the terminal),
                // and a line end.
                let shown = Zeroizing::new(crate::text::for_terminal(&value));
                out.write_all(shown.as_bytes())?;
                if !shown.ends_with('\n') {
                    out.write_all(b"\n")?;
                }
            } else {
                // Exact bytes for pipes and files.
                out.write_all(&value)?;
            }
            out.flush()?;
        }
        Output::Json => {
            let mut obj = json!({
                "path": resp.path,
                "version": resp.version,
                "current_version": resp.current_version,
                "created_time": rfc3339(resp.created_time.as_ref()),
                "value_base64": base64::engine::general_purpose::STANDARD.encode(&value[..]),
            });
            if let Ok(text) = std::str::from_utf8(&value) {
                obj["value"] = json!(text);
            }
            print_json(&obj);
        }
    }
    Ok(())
}

pub(super) async fn ls(args: &ClientArgs, prefix: String) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let mut paths = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = v1::ListRequest { prefix: prefix.clone(), page_size: 1000, page_token };
        let resp = client.list(req).await.map_err(rpc_error)?.into_inner();
        paths.extend(resp.paths);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    match args.output {
        Output::Human => paths.iter().for_each(|p| println!("{}", escaped(p))),
        Output::Json => print_json(&json!({ "prefix": prefix, "paths": paths })),
    }
    Ok(())
}

pub(super) async fn rm(args: &ClientArgs, path: String) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let resp = client
        .delete(v1::DeleteRequest { path: path.clone() })
        .await
        .map_err(rpc_error)?
        .into_inner();
    match args.output {
        Output::Human => println!("deleted {path} version {}", resp.version),
        Output::Json => print_json(&json!({
            "path": path, "version": resp.version, "deleted_time": rfc3339(resp.deleted_time.as_ref()),
        })),
    }
    Ok(())
}

pub(super) async fn undelete(args: &ClientArgs, path: String, version: u64) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let request = v1::UndeleteRequest { path: path.clone(), version };
    let resp = client.undelete(request).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => println!("undeleted {path} version {}", resp.version),
        Output::Json => print_json(&json!({ "path": path, "version": resp.version })),
    }
    Ok(())
}

pub(super) async fn destroy(args: &ClientArgs, path: String, version: u64) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let request = v1::DestroyRequest { path: path.clone(), version };
    let resp = client.destroy(request).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => println!("destroyed {path} version {}", resp.version),
        Output::Json => print_json(&json!({
            "path": path, "version": resp.version,
            "destroyed_time": rfc3339(resp.destroyed_time.as_ref()),
        })),
    }
    Ok(())
}

pub(super) async fn versions(args: &ClientArgs, path: String) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let resp = client
        .versions(v1::VersionsRequest { path: path.clone() })
        .await
        .map_err(rpc_error)?
        .into_inner();
    match args.output {
        Output::Human => {
            println!("{:<8} {:<30} {:<30} DESTROYED", "VERSION", "CREATED", "DELETED");
            let time =
                |t: Option<&prost_types::Timestamp>| t.map_or("-".into(), |t| rfc3339(Some(t)));
            for v in &resp.versions {
                let (deleted, destroyed) =
                    (time(v.deleted_time.as_ref()), time(v.destroyed_time.as_ref()));
                let created = rfc3339(v.created_time.as_ref());
                println!("{:<8} {created:<30} {deleted:<30} {destroyed}", v.version);
            }
        }
        Output::Json => {
            let versions: Vec<_> = resp
                .versions
                .iter()
                .map(|v| {
                    json!({
                        "version": v.version,
                        "created_time": rfc3339(v.created_time.as_ref()),
                        "deleted_time": v.deleted_time.as_ref().map(|t| rfc3339(Some(t))),
                        "destroyed_time": v.destroyed_time.as_ref().map(|t| rfc3339(Some(t))),
                    })
                })
                .collect();
            print_json(
                &json!({ "path": path, "current_version": resp.current_version, "versions": versions }),
            );
        }
    }
    Ok(())
}

/// A `Control` client (requests up to the service's limit: a whole policy).
pub(super) async fn control(
    args: &ClientArgs,
) -> anyhow::Result<crate::proto::v1::control_client::ControlClient<Channel>> {
    Ok(crate::proto::v1::control_client::ControlClient::new(channel(args).await?)
        .max_encoding_message_size(crate::api::MAX_CONTROL_REQUEST_BYTES))
}

/// Reports a stored control-state version: `human` or `json`, then an error naming the live
/// replicas that did not follow it within the wait (`behind`), if any.
pub(super) fn followed(
    args: &ClientArgs,
    (human, json): (String, serde_json::Value),
    version: u64,
    behind: &[String],
) -> anyhow::Result<()> {
    match args.output {
        Output::Human => println!("{human}"),
        Output::Json => print_json(&json),
    }
    if !behind.is_empty() {
        let behind: Vec<_> = behind.iter().map(|b| escaped(b).into_owned()).collect();
        anyhow::bail!(
            "version {version} is stored, but these replicas did not follow it in time: {}",
            behind.join(", ")
        );
    }
    Ok(())
}

pub(super) fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

pub(super) fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub(super) async fn whoami(args: &ClientArgs) -> anyhow::Result<()> {
    let mut client = connect(args).await?;
    let resp = client.who_am_i(v1::WhoAmIRequest {}).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => {
            println!("principal:      {}", escaped(&resp.principal));
            println!(
                "roles:          {}",
                if resp.roles.is_empty() {
                    "(none)".into()
                } else {
                    escaped(&resp.roles.join(", ")).into_owned()
                }
            );
            println!(
                "certificate:    sha256 {} serial {}",
                resp.certificate_fingerprint, resp.certificate_serial
            );
            println!("policy version: {}", resp.policy_version);
        }
        Output::Json => print_json(&json!({
            "principal": resp.principal, "roles": resp.roles,
            "certificate_fingerprint": resp.certificate_fingerprint,
            "certificate_serial": resp.certificate_serial, "policy_version": resp.policy_version,
        })),
    }
    Ok(())
}

/// `secretgate health [--ready]`: the liveness or readiness health state; an error unless
/// SERVING.
pub(super) async fn health(args: &ClientArgs, ready: bool) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let service = if ready { crate::health::READINESS } else { crate::health::LIVENESS };
    let mut client = HealthClient::new(channel(args).await?);
    let request = HealthCheckRequest { service: service.into() };
    let status = client.check(request).await.map_err(rpc_error)?.into_inner().status();
    let name = status.as_str_name();
    match args.output {
        Output::Human => println!("{service}: {name}"),
        Output::Json => print_json(&json!({ "service": service, "status": name })),
    }
    if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
        bail!("{service} is {name}");
    }
    Ok(())
}

/// `secretgate store-status`: the store backend and its read cache.
pub(super) async fn store_status(args: &ClientArgs) -> anyhow::Result<()> {
    let mut admin = crate::proto::v1::admin_client::AdminClient::new(channel(args).await?);
    let request = crate::proto::v1::StoreStatusRequest {};
    let s = admin.store_status(request).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => {
            println!("backend:     {}", s.backend);
            println!("read cache:  {}", s.cache);
            if s.backend == "etcd" && s.cache != "off" {
                println!(
                    "             {} keys, {} of {} bytes, {} reads answered from memory",
                    s.cache_entries, s.cache_bytes, s.cache_max_bytes, s.cache_hits
                );
            }
            if s.backend == "etcd" {
                let leader = if s.etcd_leader.is_empty() { "not known" } else { &s.etcd_leader };
                println!("etcd leader: {leader}");
            }
        }
        Output::Json => print_json(&json!({
            "backend": s.backend, "cache": s.cache, "cache_entries": s.cache_entries,
            "cache_bytes": s.cache_bytes, "cache_max_bytes": s.cache_max_bytes,
            "cache_hits": s.cache_hits, "etcd_leader": s.etcd_leader,
        })),
    }
    Ok(())
}

pub(super) async fn reload_status(args: &ClientArgs) -> anyhow::Result<()> {
    let mut admin = crate::proto::v1::admin_client::AdminClient::new(channel(args).await?);
    let request = crate::proto::v1::ReloadStatusRequest {};
    let s = admin.reload_status(request).await.map_err(rpc_error)?.into_inner();
    let refused = s.values.iter().filter(|v| !v.refused.is_empty()).count();
    match args.output {
        Output::Human => {
            for v in &s.values {
                // Error texts quote file contents: escaped before they reach a terminal.
                println!("{:<20} {}", v.what, crate::text::escaped(&v.version));
                if !v.refused.is_empty() {
                    println!(
                        "{:<20} REFUSED newer files: {}",
                        "",
                        crate::text::escaped(&v.refused)
                    );
                }
            }
        }
        Output::Json => {
            let values: Vec<_> = s
                .values
                .iter()
                .map(|v| json!({ "what": v.what, "version": v.version, "refused": v.refused }))
                .collect();
            print_json(&json!({ "values": values }));
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} reload(s) refused; the last good versions stay in force");
    }
    Ok(())
}

pub(super) async fn tier_status(args: &ClientArgs) -> anyhow::Result<()> {
    let mut admin = crate::proto::v1::admin_client::AdminClient::new(channel(args).await?);
    let request = crate::proto::v1::TierStatusRequest {};
    let s = admin.tier_status(request).await.map_err(rpc_error)?.into_inner();
    match args.output {
        Output::Human => {
            for r in &s.replicas {
                // Records come from the store: escaped before they reach a terminal.
                let mark = if r.answering { "*" } else { " " };
                println!(
                    "{mark} {}  {}  started {}",
                    escaped(&r.id),
                    escaped(&r.address),
                    escaped(&r.started)
                );
                println!("    keyring       {}", escaped(&r.keyring));
                println!("    policy        {}", escaped(&r.policy));
                println!("    client trust  {}", escaped(&r.client_trust));
                let audit = if r.audit_ok { "writable" } else { "FAILING (requests refused)" };
                println!("    audit log     {} {audit}", escaped(&r.audit_log_id));
            }
            println!("{} live replica(s); * answered", s.replicas.len());
        }
        Output::Json => {
            let replicas: Vec<_> = s
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id, "address": r.address, "started": r.started,
                        "keyring": r.keyring, "policy": r.policy,
                        "client_trust": r.client_trust, "audit_log_id": r.audit_log_id,
                        "audit_ok": r.audit_ok, "version": r.version, "answering": r.answering,
                    })
                })
                .collect();
            print_json(&json!({ "replicas": replicas, "disagree": s.disagree }));
        }
    }
    if !s.disagree.is_empty() {
        anyhow::bail!("the replicas do not all enforce the same {}", s.disagree.join(", "));
    }
    Ok(())
}
