//! Errors that point at the line of the policy file that caused them.

use std::path::Path;

/// A policy file that could not be loaded: where, and why.
///
/// An operator edits a policy file by hand and the gateway refuses it; the only useful error
/// is one that says which line to fix. Every error of this crate therefore carries a line and
/// a column (1-based), computed from the offset that Cedar's parser and validator report, and
/// displays as `policy.cedar:12:5: message`, the format editors and terminals turn into a
/// link. Errors about the file as a whole (it cannot be read) have line and column 0 and
/// display as `policy.cedar: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.source_name, *.line, *.column, .message))]
pub struct PolicyError {
    /// The file name (or other label) the text came from.
    pub source_name: String,
    /// 1-based line of the error; 0 when the error concerns the whole file.
    pub line: usize,
    /// 1-based column (in characters) of the error; 0 when the error concerns the whole file.
    pub column: usize,
    /// What is wrong, and where Cedar has one, a hint how to fix it.
    pub message: String,
}

fn render(source: &str, line: usize, column: usize, message: &str) -> String {
    if line == 0 {
        format!("{source}: {message}")
    } else {
        format!("{source}:{line}:{column}: {message}")
    }
}

impl PolicyError {
    /// An error at a byte offset of `text`.
    pub(crate) fn at(source_name: &str, text: &str, offset: usize, message: String) -> Self {
        let (line, column) = line_column(text, offset);
        PolicyError {
            source_name: source_name.to_owned(),
            line,
            column,
            message,
        }
    }

    /// An error about the file as a whole (unreadable, not UTF-8).
    pub(crate) fn whole_file(source_name: &str, message: String) -> Self {
        PolicyError {
            source_name: source_name.to_owned(),
            line: 0,
            column: 0,
            message,
        }
    }

    /// The file at `path` could not be read.
    pub(crate) fn io(path: &Path, err: &std::io::Error) -> Self {
        Self::whole_file(
            &path.display().to_string(),
            format!("cannot read policy file: {err}"),
        )
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
///
/// Offsets past the end or inside a multi-byte character are clamped to the nearest
/// character boundary before it, so a slightly wrong span never panics.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Renders a Cedar diagnostic: its message and, where Cedar has one, its help text.
pub(crate) fn diagnostic_message(d: &dyn miette::Diagnostic) -> String {
    let mut message = d.to_string();
    if let Some(help) = d.help() {
        message.push_str(" (");
        message.push_str(&help.to_string());
        message.push(')');
    }
    message
}

/// The byte offset of a Cedar diagnostic's first labelled span, if it has one.
pub(crate) fn diagnostic_offset(d: &dyn miette::Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 7), (2, 4)); // after the two-byte é
        assert_eq!(line_column(text, 6), (2, 3)); // inside é: clamped to its start
        assert_eq!(line_column(text, 100), (3, 2));
    }

    #[test]
    fn display_with_and_without_location() {
        let e = PolicyError {
            source_name: "policy.cedar".into(),
            line: 12,
            column: 5,
            message: "boom".into(),
        };
        assert_eq!(e.to_string(), "policy.cedar:12:5: boom");
        let e = PolicyError::whole_file("policy.cedar", "gone".into());
        assert_eq!(e.to_string(), "policy.cedar: gone");
    }
}
