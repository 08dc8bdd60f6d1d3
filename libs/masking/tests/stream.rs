//! The streaming masker gives exactly the whole-value output, however the input is cut.

use agentgate_masking::{
    MAX_HELD, MaskReport, Masker, MaskingConfig, RuleConfig, Selector, Strategy as MaskStrategy,
};
use proptest::prelude::*;

fn masker() -> Masker {
    Masker::new(&MaskingConfig::recommended(), None).expect("recommended config")
}

/// Pieces that make up test inputs: secrets of every detector, their fragments and
/// look-alikes, separators, and bytes that are not UTF-8.
const PIECES: &[&[u8]] = &[
    b"alice@example.com",
    b"bob.smith+x@mail.example.org",
    b"@",
    b"user",
    b".com",
    b"4111 1111 1111 1111",
    b"5555555555554444",
    b"378282246310005",
    b"4111",
    b"123-45-6789",
    b"(415) 555-2671",
    b"+44 20 7946 0958",
    b"1-800-555-0199",
    b"DE89 3704 0044 0532 0130 00",
    b"GB82WEST12345698765432",
    b"192.168.1.20",
    b"2001:db8::8a2e:370:7334",
    b"fe80::1",
    b"12:34:56",
    b"AKIAIOSFODNN7EXAMPLE",
    b"ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    b"xoxb-1234567890-abcdefghijklmno",
    b"AIzaSyA1234567890abcdefghijklmnopqrstuv",
    b"sk_live_abcdefghijklmnop1234",
    b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    b"eyJ",
    b"-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE/Wm/Rr500P+RK==\n-----END RSA PRIVATE KEY-----\n",
    b"-----BEGIN ",
    b"postgres://app:s3cret@db:5432/app",
    b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    b"AccountKey=",
    b" ",
    b"\n",
    b"-",
    b".",
    b":",
    b"0",
    b"7",
    b"x",
    b"\xff\xfe",
    b"\xc3",
    b"\xe2\x82\xac",
    b"caf\xc3\xa9 ",
];

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // structured: secrets and fragments glued together
        prop::collection::vec(prop::sample::select(PIECES), 0..40).prop_map(|v| v.concat()),
        // unstructured bytes
        prop::collection::vec(any::<u8>(), 0..400),
        // digit-heavy
        prop::collection::vec(prop::sample::select(&b"0123456789 -.+()@:"[..]), 0..300),
    ]
}

/// Cuts `data` at the given fractions into chunks.
fn cut(data: &[u8], fractions: &[f64]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = fractions
        .iter()
        .map(|f| ((data.len() as f64) * f) as usize)
        .collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| data[w[0]..w[1]].to_vec())
        .collect()
}

fn run_stream(m: &Masker, chunks: &[Vec<u8>]) -> (Vec<u8>, MaskReport) {
    let mut s = m.stream();
    let mut out = Vec::new();
    let mut report = MaskReport::new();
    for c in chunks {
        s.push(c, &mut out, &mut report);
        assert!(s.held() <= MAX_HELD, "held {} > {}", s.held(), MAX_HELD);
    }
    s.finish(&mut out, &mut report);
    (out, report)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn stream_equals_whole_for_any_chunking(
        data in input(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..12),
    ) {
        let m = masker();
        let mut whole_report = MaskReport::new();
        let whole = m.mask_bytes(&data, &mut whole_report).into_owned();
        let (streamed, report) = run_stream(&m, &cut(&data, &fractions));
        prop_assert_eq!(&streamed, &whole);
        prop_assert_eq!(report, whole_report);
    }

    #[test]
    fn one_byte_chunks(data in input()) {
        let m = masker();
        let mut r = MaskReport::new();
        let whole = m.mask_bytes(&data, &mut r).into_owned();
        let chunks: Vec<Vec<u8>> = data.iter().map(|b| vec![*b]).collect();
        let (streamed, _) = run_stream(&m, &chunks);
        prop_assert_eq!(streamed, whole);
    }

    #[test]
    fn masking_never_panics_and_keeps_unmatched_bytes(data in prop::collection::vec(any::<u8>(), 0..2000)) {
        let m = masker();
        let mut r = MaskReport::new();
        let out = m.mask_bytes(&data, &mut r);
        if m.find(&data).is_empty() {
            prop_assert_eq!(&out[..], &data[..]);
            prop_assert!(r.is_empty());
        }
    }
}

#[test]
fn secret_split_across_two_chunks_is_masked() {
    let m = masker();
    let text = b"token: ghp_abcdefghijklmnopqrstuvwxyz0123456789 done\n";
    for cut_at in 0..=text.len() {
        let (out, report) = run_stream(&m, &[text[..cut_at].to_vec(), text[cut_at..].to_vec()]);
        assert_eq!(out, b"token: [REDACTED] done\n", "cut at {cut_at}");
        assert_eq!(report.count("detector:github_token"), 1);
    }
}

#[test]
fn private_key_fed_byte_by_byte_is_masked_whole() {
    let mut key = b"-----BEGIN OPENSSH PRIVATE KEY-----\n".to_vec();
    for i in 0..60 {
        key.extend_from_slice(
            format!("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAB{i:08}\n").as_bytes(),
        );
    }
    key.extend_from_slice(b"-----END OPENSSH PRIVATE KEY-----\n$ ");
    let m = masker();
    let chunks: Vec<Vec<u8>> = key.iter().map(|b| vec![*b]).collect();
    let (out, report) = run_stream(&m, &chunks);
    assert_eq!(
        out,
        b"-----BEGIN OPENSSH PRIVATE KEY-----\n****\n-----END OPENSSH PRIVATE KEY-----\n$ "
    );
    assert_eq!(report.count("detector:private_key"), 1);
}

#[test]
fn flush_writes_everything_held() {
    let m = masker();
    let mut s = m.stream();
    let mut out = Vec::new();
    let mut r = MaskReport::new();
    s.push(b"$ echo hi\r\nhi\r\n$ ls", &mut out, &mut r);
    s.flush(&mut out, &mut r);
    assert_eq!(s.held(), 0);
    assert_eq!(out, b"$ echo hi\r\nhi\r\n$ ls");
    // a complete secret at the flush point is masked
    s.push(b" AKIAIOSFODNN7EXAMPLE", &mut out, &mut r);
    s.flush(&mut out, &mut r);
    assert!(out.ends_with(b" [REDACTED]"));
    s.finish(&mut out, &mut r);
}

#[test]
fn no_detectors_means_pass_through() {
    let config = MaskingConfig {
        rules: vec![RuleConfig {
            name: "emails-column".into(),
            selector: Selector::Column("public.users.email".into()),
            strategy: MaskStrategy::Redact,
        }],
    };
    let m = Masker::new(&config, None).expect("config");
    let (out, r) = run_stream(&m, &[b"alice@example.com 4111111111111111".to_vec()]);
    assert_eq!(out, b"alice@example.com 4111111111111111");
    assert!(r.is_empty());
}

#[test]
fn held_stays_bounded_on_an_endless_candidate() {
    // a BEGIN line followed by an endless key body: the block is cut at MAX_MATCH_LEN and
    // memory stays bounded
    let m = masker();
    let mut s = m.stream();
    let mut out = Vec::new();
    let mut r = MaskReport::new();
    s.push(b"-----BEGIN PRIVATE KEY-----\n", &mut out, &mut r);
    let line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\n";
    for _ in 0..10_000 {
        s.push(line, &mut out, &mut r);
        assert!(s.held() <= MAX_HELD);
    }
    s.finish(&mut out, &mut r);
    assert!(r.count("detector:private_key") >= 1);
    assert!(out.starts_with(b"-----BEGIN PRIVATE KEY-----\n****"));
}

/// Streams `chunks` through `push_borrowed` (or `push` where `copying[i % len]` says so),
/// rebuilding the output as a proxy sends it: the built bytes, then the borrowed range.
fn run_borrowed(m: &Masker, chunks: &[Vec<u8>], copying: &[bool]) -> (Vec<u8>, MaskReport) {
    let mut s = m.stream();
    let mut shown = Vec::new();
    let mut report = MaskReport::new();
    for (i, c) in chunks.iter().enumerate() {
        if !copying.is_empty() && copying[i % copying.len()] {
            s.push(c, &mut shown, &mut report);
        } else {
            let mut built = Vec::new();
            let range = s.push_borrowed(c, &mut built, &mut report);
            shown.extend_from_slice(&built);
            shown.extend_from_slice(&c[range]);
        }
        assert!(s.held() <= MAX_HELD, "held {} > {}", s.held(), MAX_HELD);
    }
    s.finish(&mut shown, &mut report);
    (shown, report)
}

/// Bulk inputs: kilobytes of filler (zeros, prose, digits, random bytes) with secrets and
/// fragments strewn in, so that chunks are large enough for the in-place path.
fn bulk_input() -> impl Strategy<Value = Vec<u8>> {
    let filler = prop_oneof![
        (1usize..3000).prop_map(|n| vec![0u8; n]),
        (1usize..3000).prop_map(|n| b"the quick brown fox jumps over the lazy dog "
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect::<Vec<u8>>()),
        prop::collection::vec(prop::sample::select(&b"0123456789 -.:@aZ\n"[..]), 1..500),
        prop::collection::vec(any::<u8>(), 1..1500),
    ];
    let piece = prop_oneof![
        filler,
        prop::sample::select(PIECES).prop_map(|p| p.to_vec()),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn borrowed_stream_equals_whole_for_any_chunking(
        data in bulk_input(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..10),
        copying in prop::collection::vec(any::<bool>(), 0..4),
    ) {
        let m = masker();
        let mut whole_report = MaskReport::new();
        let whole = m.mask_bytes(&data, &mut whole_report).into_owned();
        let (streamed, report) = run_borrowed(&m, &cut(&data, &fractions), &copying);
        prop_assert_eq!(&streamed, &whole);
        prop_assert_eq!(report, whole_report);
    }
}

/// Secrets that straddle two large packets, at every cut around the secret, with filler
/// that takes the in-place path: masked exactly as the whole stream is.
#[test]
fn secrets_split_across_large_packets_are_masked() {
    let m = masker();
    for (secret, rule) in [
        (&b"AKIAIOSFODNN7EXAMPLE"[..], "detector:aws_access_key"),
        (b"alice.smith@example.com", "detector:email"),
        (b"4111 1111 1111 1111", "detector:payment_card"),
        (
            b"ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "detector:github_token",
        ),
    ] {
        for filler in [&b"\0"[..], b"lorem ipsum dolor sit amet "] {
            let pad: Vec<u8> = filler.iter().copied().cycle().take(5000).collect();
            let mut data = pad.clone();
            data.extend_from_slice(b" ");
            data.extend_from_slice(secret);
            data.extend_from_slice(b" ");
            data.extend_from_slice(&pad);
            let at = pad.len() + 1;
            let mut whole_report = MaskReport::new();
            let whole = m.mask_bytes(&data, &mut whole_report).into_owned();
            assert_eq!(whole_report.count(rule), 1, "{rule}");
            for cut_at in at.saturating_sub(300)..at + secret.len() + 300 {
                let chunks = [data[..cut_at].to_vec(), data[cut_at..].to_vec()];
                let (out, report) = run_borrowed(&m, &chunks, &[]);
                assert_eq!(out, whole, "{rule} cut at {cut_at}");
                assert_eq!(report.count(rule), 1, "{rule} cut at {cut_at}");
            }
            // and in three pieces, the secret's middle alone
            let mid = at + secret.len() / 2;
            let chunks = [
                data[..at + 2].to_vec(),
                data[at + 2..mid].to_vec(),
                data[mid..].to_vec(),
            ];
            let (out, _) = run_borrowed(&m, &chunks, &[]);
            assert_eq!(out, whole, "{rule} in three pieces");
        }
    }
}

/// Data without anything a detector could start on passes through borrowed, nothing held.
#[test]
fn bulk_data_without_anchors_is_borrowed_whole() {
    let m = masker();
    let mut s = m.stream();
    let mut r = MaskReport::new();
    let chunk = vec![0u8; 32 * 1024];
    for _ in 0..4 {
        let mut built = Vec::new();
        let range = s.push_borrowed(&chunk, &mut built, &mut r);
        assert!(built.is_empty());
        assert_eq!(range, 0..chunk.len());
        assert_eq!(s.held(), 0);
    }
}
