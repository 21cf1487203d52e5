use super::{files::normalize, *};
use crate::text_edits::{apply_edits, edit};
use proptest::{prelude::*, test_runner::TestCaseError};

fn policy(csv: &str) -> Policy {
    Policy::from_csv(csv, "policy.csv", Vec::new(), "test".into()).unwrap()
}

fn target(path: &str) -> Target {
    Target::parse(path).unwrap()
}

#[test]
fn roles_grant_and_deny_overrides() {
    let p = policy(
        "p, role:admin, /**, *, allow\n\
         p, role:team, /apps/billing/**, write, allow\n\
         p, role:team, /apps/billing/prod/**, write, deny\n\
         g, alice, role:team\n\
         g, role:lead, role:admin\n\
         g, bob, role:lead\n",
    );
    assert!(p.decide("alice", &target("/apps/billing/db"), Action::Write).is_allow());
    let d = p.decide("alice", &target("/apps/billing/prod/key"), Action::Write);
    assert_eq!(d, Decision::Deny { rule_line: Some(3) });
    assert!(
        !p.decide("alice", &target("/apps/billing/db"), Action::Read).is_allow(),
        "no read grant"
    );
    assert_eq!(p.decide("alice", &target("/other"), Action::Read).rule_line(), None);
    assert!(p.decide("bob", &target("/anything/at/all"), Action::Admin).is_allow(), "hierarchy");
    assert!(p.decide("bob", &target("/"), Action::Admin).is_allow());
    assert_eq!(p.roles_of("bob"), ["role:lead", "role:admin"]);
}

#[test]
fn role_depth_is_bounded_like_casbin() {
    let mut csv = String::from("p, r10, /x, read, allow\np, r11, /y, read, allow\n");
    csv.push_str("g, u, r1\n");
    for i in 1..=10 {
        csv.push_str(&format!("g, r{i}, r{}\n", i + 1));
    }
    let p = policy(&csv);
    // u -> r1 -> ... -> r10 is 10 links; r9 is 9 links away.
    assert!(!p.decide("u", &target("/x"), Action::Read).is_allow(), "10 links is beyond the limit");
    let p2 = policy(&csv.replace("p, r10, /x", "p, r9, /x"));
    assert!(p2.decide("u", &target("/x"), Action::Read).is_allow(), "9 links");
}

#[test]
fn syntax_errors_name_file_and_line() {
    let cases = [
        ("p, a, /x, read\n", "4 fields"),
        ("p, a, /x*, read, allow\n", "'*'"),
        ("p, a, /x, fly, allow\n", "unknown action"),
        ("p, a, /x, read, maybe\n", "allow or deny"),
        ("g, a\n", "2 fields"),
        ("x, y\n", "start with p or g"),
    ];
    for (csv, needle) in cases {
        let text = format!("# comment\n\n{csv}");
        let err =
            Policy::from_csv(&text, "policy.csv", Vec::new(), "v".into()).unwrap_err().to_string();
        assert!(err.starts_with("policy.csv:3: "), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn model_must_be_the_supported_one() {
    assert_eq!(normalize(MODEL), normalize(&MODEL.replace(" && ", "  &&  ")));
    assert_ne!(normalize(MODEL), normalize(&MODEL.replace("pathMatch", "keyMatch")));
}

fn csv_result(csv: &str) -> Result<Policy, PolicyError> {
    Policy::from_csv(csv, "policy.csv", Vec::new(), "v".into())
}

fn is_rule_line(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

fn first_field(line: &str) -> &str {
    line.trim().split(',').next().unwrap_or_default().trim()
}

/// What `from_csv` must do with any text: accept it with one `p` rule or `g` link per
/// non-comment line, each rule knowing its own line; or refuse it naming `policy.csv`
/// and the first bad line (every line before it is fine, and it alone is refused), in
/// a message on one line with no control characters.
fn assert_csv_outcome(
    csv: &str,
    got: Result<Policy, PolicyError>,
    probe: &str,
) -> Result<(), TestCaseError> {
    let lines: Vec<&str> = csv.lines().collect();
    match got {
        Ok(p) => {
            let count =
                |kind| lines.iter().filter(|l| is_rule_line(l) && first_field(l) == kind).count();
            prop_assert_eq!(p.rule_count(), count("p"));
            prop_assert_eq!(p.link_count(), count("g"));
            prop_assert_eq!(
                p.rule_count() + p.link_count(),
                lines.iter().filter(|l| is_rule_line(l)).count()
            );
            for r in &p.rules {
                let text = p.line_text(r.line).unwrap();
                prop_assert_eq!(first_field(text), "p");
                prop_assert_eq!(text.split(',').nth(1).map(str::trim), Some(r.subject.as_str()));
            }
            // Any decision names a rule of the right effect, or none when it denies.
            for subject in p.rules.iter().map(|r| r.subject.as_str()).chain([probe]).take(8) {
                // Only canonical paths reach a decision; a probe that is not one is skipped.
                for path in [probe, "/", "/a/b"].into_iter().filter_map(|p| Target::parse(p).ok()) {
                    let d = p.decide(subject, &path, Action::Write);
                    match d.rule_line() {
                        Some(l) => {
                            let want = if d.is_allow() { Effect::Allow } else { Effect::Deny };
                            prop_assert!(
                                p.rules.iter().any(|r| r.line == l && r.effect == want),
                                "{:?}",
                                d
                            );
                        }
                        None => prop_assert!(!d.is_allow()),
                    }
                }
            }
        }
        Err(e @ PolicyError::Syntax { .. }) => {
            let shown = e.to_string();
            let PolicyError::Syntax { file, line, .. } = e else { unreachable!() };
            prop_assert_eq!(file, "policy.csv");
            prop_assert!((1..=lines.len()).contains(&line), "line {} of {}", line, lines.len());
            let prefix = format!("policy.csv:{line}: ");
            prop_assert!(shown.starts_with(&prefix), "{}", shown);
            prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
            prop_assert!(is_rule_line(lines[line - 1]), "blamed line {:?}", lines[line - 1]);
            prop_assert!(
                csv_result(&lines[..line - 1].join("\n")).is_ok(),
                "an earlier line is bad too"
            );
            let alone = csv_result(lines[line - 1]);
            prop_assert!(matches!(alone, Err(PolicyError::Syntax { line: 1, .. })), "{:?}", alone);
        }
        Err(e) => prop_assert!(false, "unexpected error {}", e),
    }
    Ok(())
}

/// Lines that are, or are close to, policy lines.
fn csv_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (
            "[a-z:]{0,6}",
            "(/[a-z*.]{0,3}){0,3}",
            "(read|write|delete|list|admin|\\*|fly|)",
            "(allow|deny|maybe)"
        )
            .prop_map(|(s, p, a, e)| format!("p, {s}, {p}, {a}, {e}")),
        2 => ("[a-z:]{0,4}", "[a-z:]{0,4}").prop_map(|(m, r)| format!("g, {m}, {r}")),
        2 => "[ \t]{0,2}#[^\n]{0,10}",
        1 => "[pg#, \t\r]{0,8}",
        1 => "\\PC{0,20}",
        1 => any::<String>(),
    ]
}

const EXAMPLE_CSV: &str = include_str!("../../../policies/policy.csv");

/// The 1-based line holding the byte at `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

#[test]
fn the_example_policy_parses_and_a_bad_line_is_found() {
    assert_csv_outcome(EXAMPLE_CSV, csv_result(EXAMPLE_CSV), "/apps/payments/prod/db").unwrap();
    let good = "g, cn:payments-dev, role:payments-team";
    let at = EXAMPLE_CSV.lines().position(|l| l == good).unwrap() + 1;
    let bad = EXAMPLE_CSV.replace(good, "g, cn:x");
    let err = csv_result(&bad);
    assert!(matches!(err, Err(PolicyError::Syntax { line, .. }) if line == at), "{err:?}");
    assert_csv_outcome(&bad, err, "/").unwrap();
}

#[test]
fn test_file_errors_at_the_start_of_a_line_name_that_line() {
    // Once reported as line 2 (lines before an error at column 1 were counted).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.conf"), MODEL).unwrap();
    std::fs::write(dir.path().join("policy.csv"), "").unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    let text = "[[case]]\nsubject = \"a\"\nbogus = 1\n";
    std::fs::write(dir.path().join("tests/t.toml"), text).unwrap();
    let err = Policy::load_untested(dir.path()).unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { line: 3, .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn from_csv_never_panics_and_blames_the_first_bad_line(
        lines in proptest::collection::vec(csv_line(), 0..8),
        probe in prop_oneof!["(/[a-z*]{0,3}){0,3}", "\\PC{0,12}"],
    ) {
        let csv = lines.join("\n");
        assert_csv_outcome(&csv, csv_result(&csv), &probe)?;
    }

    #[test]
    fn edited_example_policy_is_refused_at_a_line_or_well_formed(
        edits in proptest::collection::vec(edit(), 1..4),
        probe in "(/[a-z*]{0,6}){0,3}",
    ) {
        let csv = apply_edits(EXAMPLE_CSV, &edits);
        assert_csv_outcome(&csv, csv_result(&csv), &probe)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The table-test files are TOML read by `load_untested`: an arbitrary or edited
    /// one never panics, and a broken one is refused naming that file and a line of it.
    #[test]
    fn broken_test_files_are_refused_naming_file_and_line(
        text in prop_oneof![
            any::<String>(),
            "[\\[\\]a-z=\" \n0-9/#*]{0,200}",
            proptest::collection::vec(edit(), 0..4).prop_map(|e| apply_edits(
                "[[case]]\nsubject = \"a\"\npath = \"/x\"\naction = \"read\"\nexpect = \"deny\"\n",
                &e,
            )),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.conf"), MODEL).unwrap();
        std::fs::write(dir.path().join("policy.csv"), "p, a, /x/**, read, allow\n").unwrap();
        std::fs::create_dir(dir.path().join("tests")).unwrap();
        let file = dir.path().join("tests/t.toml");
        std::fs::write(&file, &text).unwrap();
        match Policy::load_untested(dir.path()) {
            Ok(p) => {
                let parsed: TestFile = toml::from_str(&text).unwrap();
                prop_assert_eq!(p.test_count(), parsed.case.len());
                // Running the tests is also input handling: one message per failure at most.
                prop_assert!(p.run_tests().len() <= p.test_count());
            }
            Err(PolicyError::Syntax { file: f, line, reason }) => {
                prop_assert_eq!(f, file.display().to_string());
                prop_assert!(!reason.is_empty());
                let e = toml::from_str::<TestFile>(&text).err().expect("toml refuses it too");
                let at = e.span().map_or(0, |s| s.start);
                let actual = line_at(&text, at);
                prop_assert!(line == actual, "reported line {} for an error on line {}", line, actual);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[test]
fn may_allow_under_is_an_upper_bound_on_what_a_list_can_show() {
    let p = policy(
        "p, app, /apps/billing/**, read, allow\n\
         p, app, /apps/*/public, list, allow\n\
         p, ops, /ops/db, write, allow\n\
         p, all, /**, *, allow\n\
         g, lead, app\n",
    );
    let list = [Action::List, Action::Read];
    let under = |s: &str, prefix: &str| {
        p.may_allow_under(s, &crate::path::PathPrefix::parse(prefix).unwrap(), &list)
    };
    assert!(under("app", "/"));
    assert!(under("app", "/apps"), "rules below the prefix");
    assert!(under("app", "/apps/billing/x/y"), "a ** above the prefix");
    assert!(under("app", "/apps/x/public"));
    assert!(under("lead", "/apps/billing"), "through a role");
    assert!(under("all", "/anything/at/all"));
    assert!(!under("app", "/apps/payments/prod"));
    assert!(!under("app", "/ops"));
    assert!(!under("ops", "/ops"), "write only");
    assert!(!under("stranger", "/"));
    // Where it says no, every decision below says deny.
    for path in ["/apps/payments/prod", "/apps/payments/prod/db", "/apps/payments/prod/a/public"] {
        for action in list {
            assert!(!p.decide("app", &target(path), action).is_allow(), "{action} {path}");
        }
    }
}
