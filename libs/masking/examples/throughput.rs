//! Throughput probe: best of 15 runs over the benchmark corpora, wall-clock and on-CPU time.
//! On a shared machine the on-CPU figure (from /proc/thread-self/schedstat) is the one that
//! does not count time spent waiting for a core. `benches/scan.rs` is the criterion benchmark.
//!
//! Run: `cargo run --release -p agentgate-masking --example throughput [no_match|dense]`.

use std::time::Instant;

use agentgate_masking::{MaskReport, Masker, MaskingConfig};

/// A small deterministic generator, so the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PROSE: &[&str] = &[
    "The quick brown fox jumps over the lazy dog while the agent reads the logs.",
    "Deployment finished without errors; three replicas are ready and serving traffic.",
    "Please review the pull request before merging it into the main branch.",
    "Le système a redémarré après la mise à jour du noyau, tout fonctionne.",
    "SELECT id, name, created_at FROM orders WHERE status = 'shipped' ORDER BY id;",
    "fn main() { let v = vec![1, 2, 3]; println!(\"{}\", v.len()); }",
];

/// Realistic text with no match: prose, log lines with timestamps and ids, `ls -l` output,
/// SQL and code. Digits, colons and `@`-free punctuation are frequent, as in real output.
fn no_match_corpus(size: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(size + 256);
    while out.len() < size {
        match rng.below(4) {
            0 => {
                out.push_str(PROSE[rng.below(PROSE.len() as u64) as usize]);
                out.push('\n');
            }
            1 => out.push_str(&format!(
                "2024-05-{:02}T{:02}:{:02}:{:02}.{:03}Z INFO http request_id={:016x} method=GET path=/api/v1/items/{} status={} duration_ms={}\n",
                1 + rng.below(28),
                rng.below(24),
                rng.below(60),
                rng.below(60),
                rng.below(1000),
                rng.next(),
                rng.below(100_000),
                [200, 201, 304, 404][rng.below(4) as usize],
                rng.below(900)
            )),
            2 => out.push_str(&format!(
                "-rw-r--r--  1 app  staff  {:>8} May {:>2} {:02}:{:02} report_{}.csv\n",
                rng.below(10_000_000),
                1 + rng.below(28),
                rng.below(24),
                rng.below(60),
                rng.below(1000)
            )),
            _ => out.push_str(&format!(
                "  {} | {:>6} | {:>10.2} | pending since {} days\n",
                ["alpha", "beta", "gamma", "delta"][rng.below(4) as usize],
                rng.below(100_000),
                rng.below(1_000_000) as f64 / 100.0,
                rng.below(400)
            )),
        }
    }
    out.into_bytes()
}

/// Text where most lines carry a secret or personal datum.
fn dense_corpus(size: usize) -> Vec<u8> {
    const LINES: &[&str] = &[
        "user ann.smith@example.com logged in from 203.0.113.42\n",
        "card 4111 1111 1111 1111 exp 12/29, backup 5555555555554444\n",
        "ssn 123-45-6789 phone (415) 555-2671 or +44 20 7946 0958\n",
        "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE\n",
        "GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789 SLACK=xoxb-1234567890-abcdefghijklmno\n",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U\n",
        "iban DE89 3704 0044 0532 0130 00, db postgres://app:s3cret@db.internal:5432/app\n",
    ];
    let mut out = Vec::with_capacity(size + 256);
    let mut i = 0;
    while out.len() < size {
        out.extend_from_slice(LINES[i % LINES.len()].as_bytes());
        i += 1;
    }
    out
}

fn main() {
    let masker = match Masker::new(&MaskingConfig::recommended(), None) {
        Ok(m) => m,
        Err(e) => panic!("recommended config must compile: {e}"),
    };
    let clean = no_match_corpus(4 << 20);
    let dense = dense_corpus(4 << 20);
    let which = std::env::args().nth(1).unwrap_or_default();
    for (name, data) in [("no_match", &clean), ("dense", &dense)] {
        if !which.is_empty() && which != name {
            continue;
        }
        let mut best = f64::MAX;
        let mut best_cpu = f64::MAX;
        for _ in 0..15 {
            let t = Instant::now();
            let c = cpu_ns();
            let mut r = MaskReport::new();
            let n = masker.mask_bytes(data, &mut r).len();
            std::hint::black_box(n);
            best_cpu = best_cpu.min(cpu_ns().saturating_sub(c) as f64 / 1e9);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name}: {:.0} MB/s wall, {:.0} MB/s on-CPU (best of 15, {} bytes)",
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
