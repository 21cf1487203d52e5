//! Seal+open cost of the envelope (XChaCha20-Poly1305), printed as figures.
//!
//! `cargo bench --bench crypto`. Goals (issue 3): under 2 µs for a 100-byte value, over
//! 1 GB/s for large values. Timings are medians of several batches, so a noisy neighbour
//! on a shared machine moves them less than a single mean would.

use std::{hint::black_box, time::Instant};

use secretgate::{
    SecretPath,
    testing::{Keyring, open, seal},
};

fn median_ns_per_op(batches: usize, iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters {
        f();
    }
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let ring = Keyring::generate().expect("keyring");
    let key = ring.primary();
    let path = SecretPath::parse("/payments/db/password").expect("path");
    println!("envelope: XChaCha20-Poly1305, AAD = path + version + key id");
    println!(
        "{:>10} {:>12} {:>12} {:>14} {:>12}",
        "value", "seal", "open", "seal+open", "throughput"
    );
    for (label, size, iters) in
        [("100 B", 100usize, 20_000u32), ("4 KiB", 4096, 5_000), ("64 KiB", 65536, 400)]
    {
        let value = vec![0x42u8; size];
        let sealed = seal(key, &path, 7, &value).expect("seal");
        let seal_ns = median_ns_per_op(15, iters, || {
            black_box(seal(key, &path, 7, black_box(&value)).expect("seal"));
        });
        let open_ns = median_ns_per_op(15, iters, || {
            black_box(open(&ring, &path, 7, black_box(&sealed)).expect("open"));
        });
        let both = seal_ns + open_ns;
        // Bytes of value per second through one seal and one open.
        let gbps = size as f64 / both;
        println!(
            "{label:>10} {:>10.0}ns {:>10.0}ns {:>12.2}µs {:>9.2} GB/s",
            seal_ns,
            open_ns,
            both / 1000.0,
            gbps
        );
    }
}
