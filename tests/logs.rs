//! The gateway's own log (issue 19): `log.format = "json"` gives one JSON object per line,
//! every line about a request names its request id, `debug` adds one line per request, and
//! neither format ever holds a value or a raw control character.

use secretgate::proto::v1::{GetRequest, PutRequest};
use secretgate_testkit::audit::{ServedGateway, request_id};

const ADMIN: &str = "spiffe://test.example/admin";
const VALUE: &str = "never-in-a-log-7f3a9c";

async fn traffic(gw: &ServedGateway) -> (String, String) {
    let mut c = gw.client(ADMIN).await;
    let req = PutRequest { path: "/apps/db".into(), value: VALUE.into(), expected_version: None };
    let put = c.put(req).await.unwrap();
    c.get(GetRequest { path: "/apps/db".into(), version: None }).await.unwrap();
    let refused = c.get(GetRequest { path: "/x\u{1b}[2J/y".into(), version: None }).await;
    (request_id(put.metadata()), request_id(refused.unwrap_err().metadata()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_name_the_request_and_never_the_value() {
    let mut gw = ServedGateway::prepare("").with_config("[log]\nformat = \"json\"\n");
    gw.serve("debug").await;
    let (put_id, refused_id) = traffic(&gw).await;
    gw.terminate().await;
    let log = gw.gateway_log();
    assert!(!log.contains(VALUE), "a value reached the log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |id: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["fields"]["request_id"] == id).collect()
    };
    let put = of(&put_id);
    assert_eq!(put.len(), 1, "one line per request: {put:?}");
    assert_eq!(put[0]["fields"]["message"], "ok");
    assert_eq!(put[0]["level"], "DEBUG");
    assert_eq!(put[0]["span"]["request_id"], put_id.as_str(), "the line is in the request's span");
    let refused = of(&refused_id);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["fields"]["message"], "refused");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "secretgate serving"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_escape_control_characters() {
    let mut gw = ServedGateway::prepare("");
    gw.serve("debug").await;
    let (put_id, refused_id) = traffic(&gw).await;
    gw.terminate().await;
    let log = gw.gateway_log();
    assert!(!log.contains(VALUE), "a value reached the log");
    assert!(!log.contains('\u{1b}'), "a raw escape character reached the log");
    let refused =
        log.lines().find(|l| l.contains(&refused_id)).expect("the refused request's line");
    assert!(refused.contains(r"\u{1b}[2J"), "{refused}");
    assert!(log.lines().any(|l| l.contains(&put_id) && l.contains(" ok ")), "{log}");
}
