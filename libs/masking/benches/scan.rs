//! Scanning speed with every detector on (`MaskingConfig::recommended`):
//!
//! - `no_match/logs`: log lines, `ls -l` output, tables: digits, colons and numbers
//!   everywhere, the hard case for the anchors (target ≥ 300 MB/s per core);
//! - `no_match/text`: prose, Markdown, code, JSON: the easy case;
//! - `dense_match`: a secret or personal datum on nearly every line.
//!
//! Run: `cargo bench -p agentgate-masking --bench scan`. On a shared machine, also run
//! `cargo run --release -p agentgate-masking --example throughput`, which reports on-CPU time.

mod corpus;

use std::hint::black_box;
use std::time::Duration;

use agentgate_masking::{MaskReport, Masker, MaskingConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let masker = match Masker::new(&MaskingConfig::recommended(), None) {
        Ok(m) => m,
        Err(e) => panic!("recommended config must compile: {e}"),
    };
    let size = 4 << 20;
    let logs = corpus::logs_corpus(size);
    assert!(
        masker.find(&logs).is_empty(),
        "the logs corpus must not match"
    );
    let text = corpus::text_corpus(size);
    assert!(
        masker.find(&text).is_empty(),
        "the text corpus must not match"
    );
    let dense = corpus::dense_corpus(size);
    eprintln!(
        "dense corpus: {} bytes, {} matches",
        dense.len(),
        masker.find(&dense).len()
    );

    let mut g = c.benchmark_group("no_match");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, data) in [("logs", &logs), ("text", &text)] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("{name}/mask_bytes"), |b| {
            b.iter(|| {
                let mut r = MaskReport::new();
                black_box(masker.mask_bytes(black_box(data), &mut r).len())
            })
        });
    }
    g.throughput(Throughput::Bytes(logs.len() as u64));
    g.bench_function("logs/stream_4k_chunks", |b| {
        let mut out = Vec::with_capacity(logs.len() + 1024);
        b.iter(|| {
            out.clear();
            let mut r = MaskReport::new();
            let mut s = masker.stream();
            for chunk in logs.chunks(4096) {
                s.push(chunk, &mut out, &mut r);
            }
            s.finish(&mut out, &mut r);
            black_box(out.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("dense_match");
    g.throughput(Throughput::Bytes(dense.len() as u64));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g.bench_function("mask_bytes", |b| {
        b.iter(|| {
            let mut r = MaskReport::new();
            black_box(masker.mask_bytes(black_box(&dense), &mut r).len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
