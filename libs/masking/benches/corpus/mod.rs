//! The benchmark corpora, shared by `benches/scan.rs` and `examples/throughput.rs`.
//! Generated with a fixed seed, so every run measures the same bytes.

#![allow(dead_code)]

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

/// Log-like text with no match: prose, log lines with timestamps and ids, `ls -l` output,
/// SQL and code. Digits, colons and `@`-free punctuation are frequent, as in real output.
pub fn logs_corpus(size: usize) -> Vec<u8> {
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

const TEXT: &[&str] = &[
    "Masking runs in the proxy, so that confidential values never reach the agent at all.\n",
    "## Design\n\nThe engine scans once and confirms candidates with bounded detectors.\n",
    "    let masker = Masker::new(&config, key)?; // built once per session\n",
    "def handler(event, context):\n    return {\"statusCode\": 200, \"body\": json.dumps(event)}\n",
    "{\"kind\": \"Deployment\", \"metadata\": {\"name\": \"web\", \"namespace\": \"prod\"}}\n",
    "Warning: the resource was modified by another client; retry the request.\n",
    "drwxr-xr-x  root  root  assets/\n-rw-r--r--  root  root  index.html\n",
    "SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id;\n",
    "Il était une fois un agent qui lisait des journaux très longs, ligne après ligne.\n",
    "error[E0502]: cannot borrow `v` as mutable because it is also borrowed as immutable\n",
];

/// Prose, Markdown, code, JSON and shell output with few digits: the easy end of the
/// no-match range.
pub fn text_corpus(size: usize) -> Vec<u8> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::with_capacity(size + 256);
    while out.len() < size {
        out.extend_from_slice(TEXT[rng.below(TEXT.len() as u64) as usize].as_bytes());
    }
    out
}

/// Text where most lines carry a secret or personal datum.
pub fn dense_corpus(size: usize) -> Vec<u8> {
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
