//! Bad input: invalid UTF-8, huge values and pathological patterns neither panic nor take
//! more than linear time.
//!
//! Time is measured as on-CPU time of the test thread (from /proc/thread-self/schedstat
//! where available), so that a busy shared machine does not fail the linearity checks. The
//! check: 8x the input may take at most 24x the time (linear is 8x; quadratic would be 64x),
//! i.e. the cost per byte may at most triple.

use std::time::Instant;

use agentgate_masking::{MaskReport, Masker, MaskingConfig};

fn masker() -> Masker {
    Masker::new(&MaskingConfig::recommended(), None).expect("recommended config")
}

/// On-CPU nanoseconds of this thread, or wall-clock nanoseconds where schedstat is missing.
fn now_ns(start: &Instant) -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| start.elapsed().as_nanos() as u64)
}

fn repeat_to(unit: &[u8], len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + unit.len());
    while v.len() < len {
        v.extend_from_slice(unit);
    }
    v.truncate(len);
    v
}

/// Builds an input of (about) the given length.
type Maker = Box<dyn Fn(usize) -> Vec<u8>>;

/// Pathological inputs, each built to a given length.
fn patterns() -> Vec<(&'static str, Maker)> {
    fn prefixed(prefix: &'static [u8], unit: &'static [u8]) -> Maker {
        Box::new(move |n| {
            let mut v = prefix.to_vec();
            v.extend_from_slice(&repeat_to(unit, n.saturating_sub(prefix.len())));
            v
        })
    }
    fn rep(unit: &'static [u8]) -> Maker {
        Box::new(move |n| repeat_to(unit, n))
    }
    vec![
        ("digit run", rep(b"1")),
        ("short numbers", rep(b"1 ")),
        ("card-like groups", rep(b"4111 ")),
        ("ssn-like", rep(b"123-45-")),
        ("phone-like", rep(b"+1 (415) 555-")),
        ("dotted quads", rep(b"1.1.1.1.")),
        ("at flood", rep(b"@")),
        ("a@ flood", rep(b"a@")),
        ("long local part", prefixed(b"", b"abcdefgh")),
        ("domain chain", prefixed(b"a@", b"b.")),
        ("colon flood", rep(b":")),
        ("hex colons", rep(b"1:")),
        ("double colons", rep(b"a::")),
        ("url authority", prefixed(b"postgres://", b"a:")),
        ("AKIA flood", rep(b"AKIA")),
        ("endless token", prefixed(b"ghp_", b"a")),
        ("eyJ flood", rep(b"eyJ")),
        ("endless jwt", prefixed(b"eyJhbGciOiJIUzI1NiJ9.eyJ", b"a")),
        ("BEGIN flood", rep(b"-----BEGIN ")),
        (
            "endless key",
            prefixed(b"-----BEGIN PRIVATE KEY-----\n", b"QUJD\n"),
        ),
        ("IBAN-like", rep(b"DE89 ")),
        ("invalid utf-8", rep(b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x82")),
        (
            "random bytes",
            Box::new(|n| {
                let mut x = 0x2545_f491_4f6c_dd1du64;
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 24) as u8
                    })
                    .collect()
            }),
        ),
    ]
}

/// CPU nanoseconds per input byte of masking `input`, repeated until at least 60 ms of CPU
/// time have accumulated (the CPU clock moves in scheduler ticks of a few ms).
fn cost_per_byte(m: &Masker, input: &[u8]) -> f64 {
    let start = Instant::now();
    let t0 = now_ns(&start);
    let mut reps = 0u64;
    loop {
        let mut r = MaskReport::new();
        std::hint::black_box(m.mask_bytes(input, &mut r).len());
        reps += 1;
        let spent = now_ns(&start).saturating_sub(t0);
        if spent >= 60_000_000 {
            return spent as f64 / (reps as f64 * input.len().max(1) as f64);
        }
    }
}

#[test]
fn pathological_inputs_are_linear_and_do_not_panic() {
    let m = masker();
    // debug builds are ~20x slower than release: 128 KiB and 1 MiB keep the test short
    let small = 128 << 10;
    let mut failures = Vec::new();
    for (name, make) in patterns() {
        let per_byte_small = cost_per_byte(&m, &make(small));
        let per_byte_big = cost_per_byte(&m, &make(8 * small));
        // linear: the same cost per byte; quadratic would be 8x per byte
        let ratio = per_byte_big / per_byte_small;
        println!(
            "{name:18} {:>6.1} ns/byte at {} KiB, {:>6.1} ns/byte at 8x: 8x input took {:.1}x time",
            per_byte_small,
            small >> 10,
            per_byte_big,
            8.0 * ratio
        );
        if ratio > 3.0 {
            failures.push(format!("{name}: 8x input took {:.1}x time", 8.0 * ratio));
        }
    }
    assert!(failures.is_empty(), "super-linear: {failures:?}");
}

#[test]
fn huge_value_of_50_mb() {
    let m = masker();
    let mut input = Vec::with_capacity(50 << 20);
    let segment = 50 << 20 >> 4;
    let mut i = 0;
    let pats = patterns();
    while input.len() < 50 << 20 {
        input.extend_from_slice(&(pats[i % pats.len()].1)(segment));
        input.extend_from_slice(b"\n alice@example.com 4111 1111 1111 1111 \n");
        i += 1;
    }
    let mut r = MaskReport::new();
    let out = m.mask_bytes(&input, &mut r);
    assert!(r.count("detector:email") >= 16);
    assert!(r.count("detector:payment_card") >= 16);
    assert!(!out.windows(17).any(|w| w == b"alice@example.com"));
}

#[test]
fn pathological_streams_equal_whole_values() {
    let m = masker();
    for (name, make) in patterns() {
        let input = make(24 << 10);
        let mut r = MaskReport::new();
        let whole = m.mask_bytes(&input, &mut r).into_owned();
        for chunk in [1usize, 7, 4096] {
            let mut s = m.stream();
            let mut out = Vec::new();
            let mut r2 = MaskReport::new();
            for c in input.chunks(chunk) {
                s.push(c, &mut out, &mut r2);
            }
            s.finish(&mut out, &mut r2);
            assert!(
                out == whole,
                "{name}: stream with {chunk}-byte chunks differs"
            );
            assert_eq!(r2, r, "{name}");
        }
    }
}

#[test]
fn invalid_utf8_passes_through_around_matches() {
    let m = masker();
    let input = b"\xff\xfe bad \xc3( ann@example.com \xe2\x82 4111111111111111\xa0";
    let mut r = MaskReport::new();
    let out = m.mask_bytes(input, &mut r);
    assert_eq!(
        &out[..],
        b"\xff\xfe bad \xc3( ***@example.com \xe2\x82 ************1111\xa0" as &[u8]
    );
    // text APIs take &str, so their output is valid UTF-8 by type; multibyte characters next
    // to matches survive
    let out = m.mask_text("ümlaut→ann@example.com←€4111111111111111€", &mut r);
    assert_eq!(out, "ümlaut→***@example.com←€************1111€");
}
