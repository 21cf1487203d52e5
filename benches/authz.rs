//! Authorization decision latency: casbin-rs's `Enforcer` against the gateway's index, on the
//! same policies, in the same run. `cargo bench --bench authz`.
//!
//! Policy shape (the one ANCHORS.md measured casbin on): one allow rule per role, each
//! service in its own role, plus a deny rule every 50 roles. Requests pick a random service
//! and a random path, so most are denied by default (no rule matches) and some allowed.
//! Goal (issue 4): p99 under 5 µs at 10k rules for the index.

use std::time::Instant;

use secretgate::{
    Target,
    authz::{Action, Policy, reference},
};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn policy(rules: usize) -> String {
    let mut csv = String::new();
    for i in 0..rules {
        csv.push_str(&format!("p, role{i}, /apps/app{i}/**, read, allow\n"));
        if i % 50 == 0 {
            csv.push_str(&format!("p, role{i}, /apps/app{i}/admin/**, read, deny\n"));
        }
        csv.push_str(&format!("g, spiffe://bench/svc{i}, role{i}\n"));
    }
    csv
}

fn percentiles(mut ns: Vec<u128>) -> (f64, f64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn request(rng: &mut Rng, rules: usize) -> (String, String) {
    let svc = rng.below(rules);
    // Half the requests aim at the service's own subtree.
    let app = if rng.below(2) == 0 { svc } else { rng.below(rules) };
    let leaf = if rng.below(10) == 0 { "admin/key" } else { "db/password" };
    (format!("spiffe://bench/svc{svc}"), format!("/apps/app{app}/{leaf}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!("authorization decision latency (µs), same policies and requests for both");
    println!(
        "{:>8} {:>14} {:>14} {:>12} {:>12} {:>10}",
        "rules", "casbin p50", "casbin p99", "index p50", "index p99", "speed-up"
    );
    for rules in [100usize, 1_000, 10_000, 100_000] {
        let csv = policy(rules);
        let index = Policy::from_csv(&csv, "bench", Vec::new(), String::new()).expect("policy");
        let casbin = reference::enforcer(&csv).await.expect("casbin");
        let casbin_samples = match rules {
            100 => 2000,
            1_000 => 400,
            10_000 => 60,
            _ => 12,
        };
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut casbin_ns = Vec::with_capacity(casbin_samples);
        let mut agree = 0;
        for _ in 0..casbin_samples {
            let (sub, path) = request(&mut rng, rules);
            let t = Instant::now();
            let theirs = reference::decide(&casbin, &sub, &path, Action::Read).expect("enforce");
            casbin_ns.push(t.elapsed().as_nanos());
            let target = Target::parse(&path).expect("generated paths are canonical");
            agree += usize::from(theirs == index.decide(&sub, &target, Action::Read).is_allow());
        }
        assert_eq!(agree, casbin_samples, "the index must agree with casbin");
        let mut index_ns = Vec::with_capacity(20_000);
        let mut allowed = 0usize;
        for _ in 0..20_000 {
            let (sub, path) = request(&mut rng, rules);
            let target = Target::parse(&path).expect("generated paths are canonical");
            let t = Instant::now();
            let d = index.decide(&sub, &target, Action::Read);
            index_ns.push(t.elapsed().as_nanos());
            allowed += usize::from(d.is_allow());
        }
        let (c50, c99) = percentiles(casbin_ns);
        let (i50, i99) = percentiles(index_ns);
        println!("{rules:>8} {c50:>14.1} {c99:>14.1} {i50:>12.2} {i99:>12.2} {:>9.0}×", c50 / i50);
        assert!(allowed > 0, "some requests must be allowed");
    }
}
