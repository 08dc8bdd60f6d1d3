//! Throughput probe: best of 15 runs over the benchmark corpora, wall-clock and on-CPU time.
//! On a shared machine the on-CPU figure (from /proc/thread-self/schedstat) is the one that
//! does not count time spent waiting for a core. `benches/scan.rs` is the criterion benchmark.
//!
//! Run: `cargo run --release -p agentgate-masking --example throughput [logs|text|dense]`.

#[path = "../benches/corpus/mod.rs"]
mod corpus;

use std::time::Instant;

use agentgate_masking::{MaskReport, Masker, MaskingConfig};

fn main() {
    let masker = match Masker::new(&MaskingConfig::recommended(), None) {
        Ok(m) => m,
        Err(e) => panic!("recommended config must compile: {e}"),
    };
    let size = 4 << 20;
    let which = std::env::args().nth(1).unwrap_or_default();
    for (name, data) in [
        ("logs", corpus::logs_corpus(size)),
        ("text", corpus::text_corpus(size)),
        ("dense", corpus::dense_corpus(size)),
    ] {
        if !which.is_empty() && which != name {
            continue;
        }
        let mut best = f64::MAX;
        let mut best_cpu = f64::MAX;
        for _ in 0..15 {
            let t = Instant::now();
            let c = cpu_ns();
            let mut r = MaskReport::new();
            let n = masker.mask_bytes(&data, &mut r).len();
            std::hint::black_box(n);
            best_cpu = best_cpu.min(cpu_ns().saturating_sub(c) as f64 / 1e9);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:5}: {:>4.0} MB/s wall, {:>4.0} MB/s on-CPU (best of 15 runs over {} bytes)",
            data.len() as f64 / best / 1e6,
            data.len() as f64 / best_cpu / 1e6,
            data.len()
        );
    }
}

/// On-CPU time of this thread in ns (first field of /proc/thread-self/schedstat).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
