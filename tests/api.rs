//! The gRPC API end to end: a real gateway on a loopback port, real mTLS clients.

use secretgate_testkit as support;

use secretgate::proto::v1::{
    DeleteRequest, GetRequest, ListRequest, PutRequest, VersionsRequest,
    secrets_client::SecretsClient,
};
use support::TestGateway;
use tonic::{Code, transport::Channel};

const ADMIN: &str = "spiffe://test.example/admin";

fn put(path: &str, value: &[u8], expected_version: Option<u64>) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), expected_version }
}

async fn get(c: &mut SecretsClient<Channel>, path: &str) -> Result<Vec<u8>, tonic::Status> {
    c.get(GetRequest { path: path.into(), version: None }).await.map(|r| r.into_inner().value)
}

#[tokio::test]
async fn put_get_list_delete_versions_round_trip() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;

    let v1 = c.put(put("/payments/db/password", b"hunter2", None)).await.unwrap().into_inner();
    assert_eq!(v1.version, 1);
    assert!(v1.created_time.is_some());
    let v2 = c.put(put("/payments/db/password", b"correct horse", None)).await.unwrap();
    assert_eq!(v2.into_inner().version, 2);
    c.put(put("/payments/api-key", b"k", None)).await.unwrap();
    c.put(put("/other/x", b"o", None)).await.unwrap();

    let got = c
        .get(GetRequest { path: "/payments/db/password".into(), version: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.value.as_slice(), got.version, got.current_version),
        (&b"correct horse"[..], 2, 2)
    );
    assert_eq!(got.path, "/payments/db/password");
    let old = c
        .get(GetRequest { path: "/payments/db/password".into(), version: Some(1) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((old.value.as_slice(), old.version, old.current_version), (&b"hunter2"[..], 1, 2));

    let list = c
        .list(ListRequest { prefix: "/payments".into(), page_size: 0, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.paths, ["/payments/api-key", "/payments/db/password"]);
    assert!(list.next_page_token.is_empty());

    let del = c.delete(DeleteRequest { path: "/payments/db/password".into() }).await.unwrap();
    assert_eq!(del.into_inner().version, 2);
    assert_eq!(get(&mut c, "/payments/db/password").await.unwrap_err().code(), Code::NotFound);

    let versions = c
        .versions(VersionsRequest { path: "/payments/db/password".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.current_version, 2);
    let summary: Vec<(u64, bool)> =
        versions.versions.iter().map(|v| (v.version, v.deleted_time.is_some())).collect();
    assert_eq!(summary, [(2, true), (1, false)]);
}

#[tokio::test]
async fn compare_and_set_lets_exactly_one_concurrent_writer_win() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/cas", b"base", Some(0))).await.unwrap();

    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = gw.client(ADMIN).await;
        tasks.push(tokio::spawn(async move {
            c.put(put("/cas", format!("writer {i}").as_bytes(), Some(1))).await
        }));
    }
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(r) => winners.push((i, r.into_inner().version)),
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                assert!(s.message().contains("current version is 2"), "{}", s.message());
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    let (winner, version) = winners[0];
    assert_eq!(version, 2);
    assert_eq!(get(&mut c, "/cas").await.unwrap(), format!("writer {winner}").as_bytes());

    let err = c.put(put("/cas", b"x", Some(0))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "create-only on an existing secret");
}

#[tokio::test]
async fn concurrent_unconditional_writes_all_land_as_distinct_versions() {
    let gw = TestGateway::start().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = gw.client(ADMIN).await;
        tasks.push(tokio::spawn(async move {
            c.put(put("/busy", format!("{i}").as_bytes(), None)).await.unwrap().into_inner().version
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<u64>>());
}

#[tokio::test]
async fn bad_paths_are_invalid_argument_naming_the_problem() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let cases = [
        ("", "empty"),
        ("relative/path", "start with '/'"),
        ("/a//b", "empty segment"),
        ("/a/", "empty segment"),
        ("/a/../b", "'..'"),
        ("/a/./b", "'.'"),
        ("/a b", "not allowed"),
        ("/caf\u{e9}", "U+00E9"),
        ("/a\u{0}b", "U+0000"),
        ("/", "names no secret"),
    ];
    for (path, needle) in cases {
        let s = c.put(put(path, b"v", None)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{path:?}");
        assert!(s.message().contains(needle), "{path:?}: {}", s.message());
        let s = get(&mut c, path).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "get {path:?}");
    }
    let long = format!("/{}", "a".repeat(600));
    let s = c.put(put(&long, b"v", None)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("limit is 512"), "{}", s.message());
    let deep = "/a".repeat(33);
    assert_eq!(c.put(put(&deep, b"v", None)).await.unwrap_err().code(), Code::InvalidArgument);
    let s = c
        .list(ListRequest { prefix: "/a//".into(), page_size: 0, page_token: String::new() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let listed = c
        .list(ListRequest { prefix: "/".into(), page_size: 0, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.paths.is_empty(), "nothing half-written: {:?}", listed.paths);
}

#[tokio::test]
async fn oversize_values_are_invalid_argument_and_the_limit_is_configurable() {
    let gw = TestGateway::start_with(|c| {
        c.limits.max_value_bytes = secretgate::config::Ranged::of::<1024>()
    })
    .await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/fits", &[7u8; 1024], None)).await.unwrap();
    let s = c.put(put("/too-big", &[7u8; 1025], None)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(s.message(), "value is 1025 bytes; the limit is 1024 bytes");
    assert_eq!(get(&mut c, "/too-big").await.unwrap_err().code(), Code::NotFound);

    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    c.put(put("/big", &vec![1u8; 64 * 1024], None)).await.unwrap();
    let s = c.put(put("/bigger", &vec![1u8; 64 * 1024 + 1], None)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "default limit is 64 KiB");
    // Far beyond the limit (over limit + 16 KiB) the request is refused by the transport
    // before it is decoded, so an oversize request never occupies more memory than that.
    let s = c.put(put("/huge", &vec![1u8; 1 << 20], None)).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("too large"), "{}", s.message());
}

#[tokio::test]
async fn list_pages_through_everything_once() {
    let gw = TestGateway::start().await;
    let mut c = gw.client(ADMIN).await;
    let mut expected: Vec<String> = (0..25).map(|i| format!("/svc/s{i:02}")).collect();
    for p in &expected {
        c.put(put(p, b"v", None)).await.unwrap();
    }
    c.put(put("/svcx", b"v", None)).await.unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(ListRequest { prefix: "/svc".into(), page_size: 10, page_token: token })
            .await
            .unwrap()
            .into_inner();
        assert!(page.paths.len() <= 10);
        seen.extend(page.paths);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    expected.sort();
    assert_eq!(seen, expected);

    let bad = ListRequest { prefix: "/svc".into(), page_size: 10, page_token: "/other/x".into() };
    assert_eq!(c.list(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let big = ListRequest { prefix: "/".into(), page_size: 5000, page_token: String::new() };
    assert_eq!(c.list(big).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn embedded_store_keeps_data_across_a_gateway_restart() {
    let mut gw = TestGateway::start().await;
    {
        let mut c = gw.client(ADMIN).await;
        c.put(put("/durable", b"v1", None)).await.unwrap();
        c.put(put("/durable", b"v2", None)).await.unwrap();
    }
    gw.restart().await;
    let mut c = gw.client(ADMIN).await;
    assert_eq!(get(&mut c, "/durable").await.unwrap(), b"v2");
    let next = c.put(put("/durable", b"v3", Some(2))).await.unwrap().into_inner();
    assert_eq!(next.version, 3, "version numbering continues after restart");
}

#[tokio::test]
async fn health_and_reflection_answer_over_mtls() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let gw = TestGateway::start().await;
    let channel = gw.channel(&gw.ca.client(ADMIN)).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "secretgate.v1.Secrets"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(resp.into_inner().status(), ServingStatus::Serving, "{service:?}");
    }

    // Both versions of reflection, as grpc-go serves them (older tools speak only v1alpha).
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut reflection = ServerReflectionClient::new(channel.clone());
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = reflection
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            let resp = stream.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
                panic!("unexpected reflection answer");
            };
            list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
        }};
    }
    // Each lists itself as the reflection service; the rest is the same.
    let others = |names: Vec<String>| -> Vec<String> {
        names.into_iter().filter(|n| !n.starts_with("grpc.reflection.")).collect()
    };
    let names = list_services!(v1);
    assert_eq!(
        others(list_services!(v1alpha)),
        others(names.clone()),
        "v1alpha lists what v1 does"
    );
    assert!(names.contains(&"secretgate.v1.Secrets".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}
