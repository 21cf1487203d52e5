//! Authorization end to end: two real client identities over mTLS against a real gateway,
//! and policy files rewritten on disk while it runs.

use secretgate_testkit as support;

use std::time::{Duration, Instant};

use secretgate::{
    Reloaded,
    proto::v1::{
        DeleteRequest, GetRequest, KeyStatusRequest, ListRequest, PutRequest, VersionsRequest,
        WhoAmIRequest, secrets_client::SecretsClient,
    },
};
use support::{TestGateway, write_policy};
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";
const APP: &str = "spiffe://test.example/app";
const TEAM: &str = "spiffe://test.example/team-member";

const POLICY: &str = "\
p, role:admin, /**, *, allow
p, spiffe://test.example/app, /apps/app/**, read, allow
p, spiffe://test.example/app, /apps/app/**, list, allow
p, role:team, /apps/team/**, *, allow
p, role:team, /apps/team/prod/**, write, deny
g, spiffe://test.example/admin, role:admin
g, spiffe://test.example/team-member, role:team
";

fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version: None }
}

fn get(path: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None }
}

async fn seeded() -> (TestGateway, SecretsClient<Channel>) {
    let gw = TestGateway::start_with_policy(POLICY, |_| {}).await;
    let mut admin = gw.client(ADMIN).await;
    for p in [
        "/apps/app/db",
        "/apps/app/api/key",
        "/apps/team/staging/db",
        "/apps/team/prod/db",
        "/apps/other/x",
    ] {
        admin.put(put(p, b"v")).await.unwrap();
    }
    (gw, admin)
}

/// Waits until the gateway's policy gives `who` roles satisfying `ok`.
async fn wait_for_policy(c: &mut SecretsClient<Channel>, ok: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let me = c.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
        if ok(&me.roles) {
            return;
        }
        assert!(Instant::now() < deadline, "policy not reloaded: {me:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_app_reads_its_own_subtree_and_nothing_else() {
    let (gw, _admin) = seeded().await;
    let mut app = gw.client(APP).await;
    assert_eq!(app.get(get("/apps/app/db")).await.unwrap().into_inner().value, b"v");
    let versions = app.versions(VersionsRequest { path: "/apps/app/db".into() }).await;
    assert!(versions.is_ok(), "read covers Versions");

    let s = app.get(get("/apps/other/x")).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        s.message(),
        "permission denied: spiffe://test.example/app may not read /apps/other/x"
    );
    // A sibling whose name starts like the app's subtree is not part of it.
    let s = app.get(get("/apps/app-evil/x")).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // Denied for missing secrets too: no existence oracle.
    assert_eq!(
        app.get(get("/apps/other/missing")).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let s = app.put(put("/apps/app/db", b"overwrite")).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("may not write /apps/app/db"), "{}", s.message());
    assert!(!s.message().contains("role:") && !s.message().contains("allow"), "no policy text");
    let s = app.delete(DeleteRequest { path: "/apps/app/db".into() }).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // The refused write changed nothing.
    let db = app.get(get("/apps/app/db")).await.unwrap().into_inner();
    assert_eq!((db.value.as_slice(), db.version), (&b"v"[..], 1));
}

#[tokio::test]
async fn an_explicit_deny_overrides_a_role_grant() {
    let (gw, _admin) = seeded().await;
    let mut team = gw.client(TEAM).await;
    team.put(put("/apps/team/staging/db", b"new")).await.unwrap();
    let s = team.put(put("/apps/team/prod/db", b"new")).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        team.get(get("/apps/team/prod/db")).await.unwrap().into_inner().value,
        b"v",
        "read still allowed"
    );
}

#[tokio::test]
async fn list_returns_only_what_the_caller_may_list_or_read() {
    let (gw, _admin) = seeded().await;
    let mut app = gw.client(APP).await;
    let list = |prefix: &str, page_size| ListRequest {
        prefix: prefix.into(),
        page_size,
        page_token: String::new(),
    };
    let all = app.list(list("/", 0)).await.unwrap().into_inner();
    assert_eq!(all.paths, ["/apps/app/api/key", "/apps/app/db"]);
    assert!(all.next_page_token.is_empty());
    let none = app.list(list("/apps/other", 0)).await.unwrap().into_inner();
    assert!(none.paths.is_empty());
    // Paging with page size 1 still yields exactly the visible paths.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .list(ListRequest { prefix: "/".into(), page_size: 1, page_token: token })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.paths);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["/apps/app/api/key", "/apps/app/db"]);
    let mut admin = gw.client(ADMIN).await;
    assert_eq!(admin.list(list("/", 0)).await.unwrap().into_inner().paths.len(), 5);
}

#[tokio::test]
async fn page_tokens_never_reveal_a_hidden_path_and_cannot_be_forged() {
    let (gw, mut admin) = seeded().await;
    // Many hidden names before the visible ones: a page of 1 runs out of scan budget (10
    // names) on hidden paths and must still return a token to continue.
    for i in 0..30 {
        admin.put(put(&format!("/apps/aaa-hidden-{i:02}"), b"v")).await.unwrap();
    }
    let mut app = gw.client(APP).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut tokens = 0;
    loop {
        let req = ListRequest { prefix: "/apps".into(), page_size: 1, page_token: token };
        let page = app.list(req).await.unwrap().into_inner();
        seen.extend(page.paths);
        if page.next_page_token.is_empty() {
            break;
        }
        tokens += 1;
        assert!(!page.next_page_token.contains("hidden"), "{}", page.next_page_token);
        token = page.next_page_token;
    }
    assert!(tokens >= 3, "the hidden names took several short pages");
    assert_eq!(seen, ["/apps/app/api/key", "/apps/app/db"]);
    // A path or an altered token is refused.
    for bad in ["/apps/app/db".to_owned(), format!("{}A", "x".repeat(60))] {
        let req = ListRequest { prefix: "/apps".into(), page_size: 1, page_token: bad };
        assert_eq!(app.list(req).await.unwrap_err().code(), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn whoami_reports_principal_roles_certificate_and_policy_version() {
    let (gw, _admin) = seeded().await;
    let mut team = gw.client(TEAM).await;
    let me = team.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.principal, TEAM);
    assert_eq!(me.roles, ["role:team"]);
    assert_eq!(me.certificate_fingerprint.len(), 64);
    assert!(!me.certificate_serial.is_empty());
    assert_eq!(me.policy_version.len(), 12);
}

#[tokio::test]
async fn admin_rpcs_need_the_admin_action() {
    let (gw, _admin) = seeded().await;
    let s = gw.admin(APP).await.key_status(KeyStatusRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("may not admin /"), "{}", s.message());
    gw.admin(ADMIN).await.key_status(KeyStatusRequest {}).await.unwrap();
}

#[tokio::test]
async fn a_policy_rewritten_on_disk_takes_effect_and_a_broken_one_does_not() {
    let (gw, _admin) = seeded().await;
    let dir = &gw.config.authz.policies;
    let mut app = gw.client(APP).await;
    assert_eq!(app.get(get("/apps/other/x")).await.unwrap_err().code(), Code::PermissionDenied);
    let before = app.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner().policy_version;

    // Grant the app /apps/other through a new role: takes effect without a restart.
    write_policy(
        dir,
        &format!(
            "{POLICY}p, role:other-reader, /apps/other/**, read, allow\ng, {APP}, role:other-reader\n"
        ),
    );
    wait_for_policy(&mut app, |roles| roles == ["role:other-reader"]).await;
    assert_eq!(app.get(get("/apps/other/x")).await.unwrap().into_inner().value, b"v");
    let granted = app.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner().policy_version;
    assert_ne!(granted, before);

    // A policy that does not parse is refused (the gateway says so, naming the line) and the
    // last good one stays in force.
    let mut admin = gw.client(ADMIN).await;
    write_policy(dir, "p, role:admin, /**, *, allow\np, oops\n");
    gw.refused_reload(Reloaded::Policy, "policy.csv:2").await;
    let me = app.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!(me.policy_version, granted, "a broken policy was loaded: {me:?}");
    assert_eq!(app.get(get("/apps/other/x")).await.unwrap().into_inner().value, b"v");

    // So is a policy that parses but fails its own table tests.
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    let failing_test = "[[case]]\nsubject = \"spiffe://test.example/app\"\npath = \"/apps/other/x\"\naction = \"read\"\nexpect = \"deny\"\n";
    std::fs::write(dir.join("tests/t.toml"), failing_test).unwrap();
    write_policy(
        dir,
        &format!(
            "{POLICY}p, role:other-reader, /apps/other/**, read, allow\ng, {APP}, role:other-reader\ng, {ADMIN}, role:marker\n"
        ),
    );
    gw.refused_reload(Reloaded::Policy, "policy tests fail").await;
    let me = admin.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert!(
        !me.roles.contains(&"role:marker".to_string()),
        "a policy failing its tests was loaded"
    );
    assert_eq!(me.policy_version, granted);
    // Fix the test: now the same policy loads.
    std::fs::remove_file(dir.join("tests/t.toml")).unwrap();
    wait_for_policy(&mut admin, |roles| roles.contains(&"role:marker".to_string())).await;
    assert_eq!(app.get(get("/apps/other/x")).await.unwrap().into_inner().value, b"v");
}
