//! The fast path must answer exactly what casbin answers: 100,000 generated requests over
//! generated policies with roles, hierarchy (including cycles and chains past the depth
//! limit), wildcards and denies, each asked of both `Policy::decide` and casbin's `Enforcer`.

use secretgate::{
    Target,
    authz::{Action, Policy, reference},
};

/// A small deterministic generator (SplitMix64): failures reproduce from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const USERS: &[&str] = &["spiffe://t/u0", "spiffe://t/u1", "dns:u2.example", "cn:u3"];
const ROLES: &[&str] = &["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
const SEGMENTS: &[&str] = &["a", "b", "c"];
const ACTIONS: &[Action] =
    &[Action::Read, Action::Write, Action::Delete, Action::List, Action::Admin];

fn pattern(rng: &mut Rng) -> String {
    let depth = 1 + rng.below(4);
    let mut out = String::new();
    for i in 0..depth {
        out.push('/');
        match rng.below(10) {
            0 | 1 => out.push('*'),
            2 | 3 if i + 1 == depth => out.push_str("**"),
            _ => out.push_str(rng.pick(SEGMENTS)),
        }
    }
    out
}

fn policy_csv(rng: &mut Rng) -> String {
    let mut csv = String::new();
    for _ in 0..(5 + rng.below(36)) {
        let subject = if rng.below(3) == 0 { rng.pick(USERS) } else { rng.pick(ROLES) };
        let action =
            if rng.below(3) == 0 { "*" } else { ACTIONS[rng.below(ACTIONS.len())].as_str() };
        let effect = if rng.below(6) == 0 { "deny" } else { "allow" };
        csv.push_str(&format!("p, {subject}, {}, {action}, {effect}\n", pattern(rng)));
    }
    for _ in 0..(4 + rng.below(14)) {
        let member = if rng.below(2) == 0 { rng.pick(USERS) } else { rng.pick(ROLES) };
        csv.push_str(&format!("g, {member}, {}\n", rng.pick(ROLES)));
    }
    csv
}

fn request_path(rng: &mut Rng) -> String {
    if rng.below(20) == 0 {
        return "/".into();
    }
    (0..1 + rng.below(3)).map(|_| format!("/{}", rng.pick(&["a", "b", "c", "d"]))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_agrees_with_casbin_on_100k_requests() {
    const POLICIES: usize = 200;
    const REQUESTS: usize = 500;
    let mut compared = 0;
    let mut allowed = 0;
    for seed in 0..POLICIES as u64 {
        let mut rng = Rng(seed);
        let csv = policy_csv(&mut rng);
        let fast = Policy::from_csv(&csv, "generated", Vec::new(), String::new()).unwrap();
        let casbin = reference::enforcer(&csv).await.unwrap();
        for _ in 0..REQUESTS {
            let subject = match rng.below(5) {
                0 => rng.pick(ROLES),
                1 => "spiffe://t/stranger",
                _ => rng.pick(USERS),
            };
            let path = request_path(&mut rng);
            let action = ACTIONS[rng.below(ACTIONS.len())];
            let target = Target::parse(&path).unwrap();
            let ours = fast.decide(subject, &target, action).is_allow();
            let theirs = reference::decide(&casbin, subject, &path, action).unwrap();
            assert_eq!(ours, theirs, "seed {seed}: {subject} {action} {path}\npolicy:\n{csv}");
            compared += 1;
            allowed += usize::from(ours);
        }
    }
    assert_eq!(compared, 100_000);
    // Guard against a generator that only ever produces denials (or only allows).
    assert!(allowed > 10_000 && allowed < 90_000, "allowed {allowed} of {compared}");
}

#[tokio::test]
async fn role_chains_around_the_depth_limit_agree_with_casbin() {
    for length in 8..=12 {
        let mut csv = format!("p, r{length}, /x, read, allow\ng, u, r1\n");
        for i in 1..length {
            csv.push_str(&format!("g, r{i}, r{}\n", i + 1));
        }
        let fast = Policy::from_csv(&csv, "chain", Vec::new(), String::new()).unwrap();
        let casbin = reference::enforcer(&csv).await.unwrap();
        let ours = fast.decide("u", &Target::parse("/x").unwrap(), Action::Read).is_allow();
        let theirs = reference::decide(&casbin, "u", "/x", Action::Read).unwrap();
        assert_eq!(ours, theirs, "chain of {length} links");
    }
}

#[tokio::test]
async fn keymatch_foot_guns_do_not_apply() {
    let csv = "p, app, /secret/app/**, read, allow\np, app, /a/*/read, read, allow\n";
    let fast = Policy::from_csv(csv, "t", Vec::new(), String::new()).unwrap();
    let casbin = reference::enforcer(csv).await.unwrap();
    for (path, expect) in [
        ("/secret/app-evil/x", false),
        ("/a/b/write", false),
        ("/secret/app/x", true),
        ("/sé", false),
    ] {
        // A path that is not canonical never reaches the index: it is refused as a target.
        let ours =
            Target::parse(path).is_ok_and(|t| fast.decide("app", &t, Action::Read).is_allow());
        assert_eq!(ours, expect, "{path}");
        assert_eq!(
            reference::decide(&casbin, "app", path, Action::Read).unwrap(),
            expect,
            "casbin {path}"
        );
    }
}
