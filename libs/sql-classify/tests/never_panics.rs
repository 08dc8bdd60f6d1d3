//! Whatever an agent sends, classification returns (an answer or an error); it never panics.

use agentgate_sql_classify::{Classifier, PreparedStatements, classify, risk};
use proptest::prelude::*;

/// Fragments that make the generated text look like SQL often enough to reach deep into the
/// grammar and the tree walk, including the constructs the classifier treats specially.
const FRAGMENTS: &[&str] = &[
    "SELECT",
    "DELETE",
    "FROM",
    "WHERE",
    "WITH",
    "AS",
    "(",
    ")",
    ",",
    ";",
    "t",
    "s.t",
    "1",
    "'x'",
    "$$DROP TABLE t$$",
    "$1",
    "EXPLAIN",
    "ANALYZE",
    "PREPARE p",
    "EXECUTE p",
    "INTO",
    "UPDATE",
    "SET",
    "=",
    "true",
    "OR",
    "COPY",
    "TO",
    "STDOUT",
    "PROGRAM",
    "pg_terminate_backend",
    "set_config('role', 'x', false)",
    "ROLE",
    "RETURNING *",
    "/*",
    "*/",
    "--",
    "\n",
    "E'\\''",
    "INSERT",
    "VALUES",
    "CREATE",
    "TABLE",
    "FUNCTION",
    "DO",
    "CALL",
    "GRANT",
    "é",
    "\"q\"",
];

fn sqlish() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40)
        .prop_map(|fragments| fragments.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(sql in any::<String>()) {
        check(&sql);
    }

    #[test]
    fn sql_like_text_never_panics(sql in sqlish()) {
        check(&sql);
    }

    #[test]
    fn arbitrary_bytes_as_lossy_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check(&String::from_utf8_lossy(&bytes));
    }
}

fn check(sql: &str) {
    match classify(sql) {
        Ok(classification) => {
            for statement in &classification.statements {
                assert!(
                    statement
                        .risk_classes
                        .iter()
                        .all(|class| risk::ALL.contains(class))
                );
                assert_eq!(statement.text, sql[statement.span.clone()]);
            }
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
            if let Some(position) = error.position() {
                assert!(
                    position >= 1 && position <= sql.chars().count() + 1,
                    "{error:?}"
                );
            }
        }
    }
    let classifier = Classifier::with_limits(16, 64 * 1024);
    let mut session = PreparedStatements::new();
    let _ = session.classify(&classifier, sql);
}
