//! Throughput probe: mean over at least 3 s of CPU per corpus, by on-CPU and wall-clock time.
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
        // warm up, then run for at least 3 s of CPU time; the totals make the scheduler-tick
        // granularity of the CPU clock (a few ms) negligible
        let mut r = MaskReport::new();
        std::hint::black_box(masker.mask_bytes(&data, &mut r).len());
        let (t, c) = (Instant::now(), cpu_ns());
        let mut runs = 0u64;
        while cpu_ns().saturating_sub(c) < 3_000_000_000 || runs < 10 {
            let mut r = MaskReport::new();
            std::hint::black_box(masker.mask_bytes(&data, &mut r).len());
            runs += 1;
        }
        let cpu = cpu_ns().saturating_sub(c) as f64 / 1e9;
        let wall = t.elapsed().as_secs_f64();
        let bytes = (data.len() as u64 * runs) as f64;
        println!(
            "{name:5}: {:>5.0} MB/s on-CPU, {:>5.0} MB/s wall ({runs} runs over {} bytes, {:.1} s CPU, {:.1} s wall)",
            bytes / cpu / 1e6,
            bytes / wall / 1e6,
            data.len(),
            cpu,
            wall
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
