//! A small lexical scan of a policy file that Cedar already parsed: where each policy starts
//! and where its annotations are.
//!
//! Cedar keeps source spans for its own errors, but the public API gives no span for a
//! policy or an annotation. agentgate reports its own errors (a bad `@approvals` value, an
//! unknown risk class) with a line too, so it finds them here. The scan only has to
//! understand what separates policies: string literals (which may contain `;` and `@`),
//! `//` comments, and the `;` that ends each policy. It runs after Cedar accepted the text,
//! so it never has to deal with broken syntax.

/// Where one policy of the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicySpan {
    /// Byte offset of the policy's first token (an annotation or `permit`/`forbid`).
    pub start: usize,
    /// Byte offset just past its closing `;`.
    pub end: usize,
    /// Each annotation key with the byte offset of its `@`.
    pub annotations: Vec<(String, usize)>,
}

/// Splits `text` into its policies, in source order (the order Cedar numbers them in).
pub(crate) fn policy_spans(text: &str) -> Vec<PolicySpan> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut current: Option<PolicySpan> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                current.get_or_insert_with(|| new_span(i));
                i = skip_string(bytes, i);
                continue;
            }
            b';' => {
                if let Some(mut span) = current.take() {
                    span.end = i + 1;
                    spans.push(span);
                }
            }
            b'@' => {
                let span = current.get_or_insert_with(|| new_span(i));
                let key_start = i + 1;
                let mut key_end = key_start;
                while key_end < bytes.len()
                    && (bytes[key_end].is_ascii_alphanumeric() || bytes[key_end] == b'_')
                {
                    key_end += 1;
                }
                span.annotations
                    .push((text[key_start..key_end].to_owned(), i));
                i = key_end;
                continue;
            }
            b if b.is_ascii_whitespace() => {}
            _ => {
                current.get_or_insert_with(|| new_span(i));
            }
        }
        i += 1;
    }
    spans
}

fn new_span(start: usize) -> PolicySpan {
    PolicySpan {
        start,
        end: start,
        annotations: Vec::new(),
    }
}

/// The offset just past the string literal that starts at `start` (a `"`).
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The offset of the first string literal equal to `value` (written without escapes) in
/// `text[range]`, outside comments.
pub(crate) fn find_string_literal(
    text: &str,
    start: usize,
    end: usize,
    value: &str,
) -> Option<usize> {
    let bytes = text.as_bytes();
    let end = end.min(bytes.len());
    let mut i = start;
    while i < end {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < end && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                let close = skip_string(bytes, i);
                if close >= i + 2 && text.get(i + 1..close - 1) == Some(value) {
                    return Some(i);
                }
                i = close;
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_policies_and_finds_annotations() {
        let text = r#"
// a comment; with @things "and quotes
@id("a;b") @approvals("2")
permit (principal, action, resource) when { context.role == "x;@y" };

forbid (principal, action, resource);
"#;
        let spans = policy_spans(text);
        assert_eq!(spans.len(), 2);
        assert!(text[spans[0].start..].starts_with("@id"));
        assert!(text[spans[1].start..].starts_with("forbid"));
        let keys: Vec<_> = spans[0]
            .annotations
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["id", "approvals"]);
        assert!(text[spans[0].annotations[1].1..].starts_with("@approvals"));
        assert!(text[..spans[0].end].ends_with("\"x;@y\" };"));
        let at = find_string_literal(text, spans[0].start, spans[0].end, "x;@y");
        assert!(at.is_some_and(|at| text[at..].starts_with("\"x;@y\"")));
        assert_eq!(find_string_literal(text, 0, text.len(), "nope"), None);
    }
}
