//! Stream-masking probe: `StreamMasker::push` (copies) against `push_borrowed` (passes
//! unchanged bytes through in place) on 32 KiB chunks, as ssh-proxy feeds terminal output.
//! On-CPU time of this thread, as in `throughput.rs`.
//!
//! Run: `cargo run --release -p agentgate-masking --example stream_throughput`.

#[path = "../benches/corpus/mod.rs"]
mod corpus;

use agentgate_masking::{MaskReport, Masker, MaskingConfig};

fn main() {
    // The detectors of the ssh-proxy benchmark's policy, and the recommended set.
    let bench: MaskingConfig = match serde_json::from_str(
        r#"{"rules": [
            {"name": "k", "selector": {"detector": "aws_access_key"}, "strategy": "redact"},
            {"name": "e", "selector": {"detector": "email"}, "strategy": "redact"},
            {"name": "c", "selector": {"detector": "payment_card"}, "strategy": "redact"}
        ]}"#,
    ) {
        Ok(c) => c,
        Err(e) => panic!("config: {e}"),
    };
    let chunk = 32 * 1024;
    let size = 8 << 20;
    for (config_name, config) in [
        ("bench detectors", bench),
        ("recommended", MaskingConfig::recommended()),
    ] {
        let masker = match Masker::new(&config, None) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        for (name, data) in [
            ("zeros", vec![0u8; size]),
            ("logs", corpus::logs_corpus(size)),
            ("text", corpus::text_corpus(size)),
        ] {
            for borrowed in [false, true] {
                let mut runs = 0u64;
                let c = cpu_ns();
                while cpu_ns().saturating_sub(c) < 1_500_000_000 || runs < 3 {
                    let mut s = masker.stream();
                    let mut r = MaskReport::new();
                    let mut sent = 0usize;
                    for piece in data.chunks(chunk) {
                        let mut out = Vec::with_capacity(if borrowed { 0 } else { piece.len() });
                        if borrowed {
                            let range = s.push_borrowed(piece, &mut out, &mut r);
                            sent += out.len() + range.len();
                        } else {
                            s.push(piece, &mut out, &mut r);
                            sent += out.len();
                        }
                        std::hint::black_box(&out);
                    }
                    std::hint::black_box(sent);
                    runs += 1;
                }
                let cpu = cpu_ns().saturating_sub(c) as f64 / 1e9;
                println!(
                    "{config_name:16} {name:5} {:9}: {:>6.0} MB/s on-CPU",
                    if borrowed { "borrowed" } else { "push" },
                    (data.len() as u64 * runs) as f64 / cpu / 1e6
                );
            }
        }
    }
}

/// On-CPU time of this thread in ns (first field of /proc/thread-self/schedstat).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
