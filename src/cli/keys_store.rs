//! `secretgate keys add|promote|retire|status --store`: the keyring kept in the store
//! (`crypto.source = "store"`), changed through the gateway's Control service, each step a
//! new keyring version that every replica follows.

use anyhow::bail;
use serde_json::json;

use super::{ClientArgs, Output, client};
use crate::{proto::v1, text::escaped};

fn report(what: &str, r: &v1::KeyChangeResponse, conn: &ClientArgs) -> anyhow::Result<()> {
    let human = format!(
        "{what} {} in keyring version {}; {} live replica(s) follow it",
        escaped(&r.id),
        r.version,
        r.enforcing.len()
    );
    let json = json!({
        "id": r.id, "version": r.version, "enforcing": r.enforcing, "behind": r.behind,
    });
    client::followed(conn, (human, json), r.version, &r.behind)
}

pub(super) async fn add(conn: &ClientArgs) -> anyhow::Result<()> {
    let request = v1::AddKeyRequest { wait_ms: 0 };
    let r = client::control(conn)
        .await?
        .add_key(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    report("added active key", &r, conn)?;
    if conn.output == Output::Human {
        println!("next: secretgate keys promote {} --store", escaped(&r.id));
    }
    Ok(())
}

pub(super) async fn promote(id: &str, conn: &ClientArgs) -> anyhow::Result<()> {
    let request = v1::KeyRequest { id: id.to_owned(), wait_ms: 0 };
    let r = client::control(conn)
        .await?
        .promote_key(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    report("promoted", &r, conn)?;
    if conn.output == Output::Human {
        println!("next: secretgate keys rewrap");
    }
    Ok(())
}

pub(super) async fn retire(id: &str, conn: &ClientArgs) -> anyhow::Result<()> {
    let request = v1::KeyRequest { id: id.to_owned(), wait_ms: 0 };
    let r = client::control(conn)
        .await?
        .retire_key(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    report("retired", &r, conn)
}

/// `secretgate kek-reseal`: every control object kept in the store sealed again under the
/// gateway's current KEK.
pub(super) async fn reseal(conn: &ClientArgs) -> anyhow::Result<()> {
    let request = v1::ResealRequest { wait_ms: 0 };
    let r = client::control(conn)
        .await?
        .reseal_control_state(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    let mut behind = Vec::new();
    for o in &r.objects {
        if conn.output == Output::Human {
            println!(
                "{} sealed again as version {}; {} live replica(s) follow it",
                o.kind,
                o.version,
                o.enforcing.len()
            );
        }
        behind.extend(o.behind.iter().map(|b| escaped(b).into_owned()));
    }
    match conn.output {
        Output::Human => println!("under KEK {}", escaped(&r.kek_id)),
        Output::Json => {
            let objects: Vec<_> = r
                .objects
                .iter()
                .map(|o| json!({"kind": o.kind, "version": o.version, "enforcing": o.enforcing, "behind": o.behind}))
                .collect();
            client::print_json(&json!({ "objects": objects, "kek_id": r.kek_id }));
        }
    }
    if !behind.is_empty() {
        bail!("these replicas did not follow in time: {}", behind.join(", "));
    }
    Ok(())
}
