//! The shape of a statement: its text with numeric constants blanked out.
//!
//! Clients that do not use parameters (`pgbench -M simple`, string-built queries) send the
//! same statement with a different number each time, and each would be a cache miss costing
//! a full parse. Numbers cannot change what a plain `SELECT` or `INSERT` is classified as
//! (functions, tables and statement types decide that; strings are kept, since
//! `set_config('role', …)` turns on one), so for those the classification is also cached by
//! shape. Not for `UPDATE` and `DELETE`: `WHERE 1 = 1` is unbounded and `WHERE 1 = 2` is
//! not, so their numbers matter.

/// The text with each numeric constant replaced by a marker byte, or `None` when it has no
/// numeric constant (the exact text is then its own key) or when it cannot be lexed safely
/// (an unterminated quote or comment: the exact-text path handles it).
pub(crate) fn shape_key(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    // NUL first: no text a client sends can contain it (messages are NUL-terminated), so a
    // shape key never equals a real statement's exact-text key.
    let mut out = String::with_capacity(sql.len() + 1);
    out.push('\0');
    let mut i = 0;
    let mut last = 0;
    let mut found = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' => i = skip_quoted(b, i, b'\'', backslash_escapes(b, i))?,
            b'"' => i = skip_quoted(b, i, b'"', false)?,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            b'$' => i = skip_dollar(b, i)?,
            b'0'..=b'9' | b'.' if starts_number(b, i) => {
                let end = number_end(b, i);
                out.push_str(&sql[last..i]);
                out.push('\u{1}');
                last = end;
                found = true;
                i = end;
            }
            _ if is_ident_byte(c) => {
                while i < b.len() && is_ident_byte(b[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if !found {
        return None;
    }
    out.push_str(&sql[last..]);
    Some(out)
}

/// The text inside the first top-level parentheses of `text` (quotes, comments and dollar
/// strings skipped), e.g. the query of `COPY (SELECT …) TO STDOUT`.
pub(crate) fn parenthesized(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut start = None;
    while i < b.len() {
        match b[i] {
            b'\'' => i = skip_quoted(b, i, b'\'', backslash_escapes(b, i))?,
            b'"' => i = skip_quoted(b, i, b'"', false)?,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            b'$' => i = skip_dollar(b, i)?,
            b'(' => {
                depth += 1;
                if depth == 1 {
                    start = Some(i + 1);
                }
                i += 1;
            }
            b')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return text.get(start?..i);
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn starts_number(b: &[u8], i: usize) -> bool {
    let prev_ok = i == 0 || !is_ident_byte(b[i - 1]) && b[i - 1] != b'.';
    let digit_here =
        b[i].is_ascii_digit() || (b[i] == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit));
    prev_ok && digit_here
}

fn number_end(b: &[u8], mut i: usize) -> usize {
    // Digits, '.', '_' separators, exponents, hex/octal/binary prefixes: anything that keeps
    // the token going in PostgreSQL's lexer is part of the constant.
    while i < b.len() {
        let c = b[i];
        let exponent_sign = (c == b'+' || c == b'-') && i > 0 && matches!(b[i - 1], b'e' | b'E');
        if c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || exponent_sign {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// `E'...'` strings take backslash escapes.
fn backslash_escapes(b: &[u8], quote: usize) -> bool {
    quote > 0 && matches!(b[quote - 1], b'e' | b'E') && (quote == 1 || !is_ident_byte(b[quote - 2]))
}

fn skip_quoted(b: &[u8], start: usize, q: u8, escapes: bool) -> Option<usize> {
    let mut i = start + 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn skip_block_comment(b: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// `$1` parameters and `$tag$ ... $tag$` strings.
fn skip_dollar(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if b.get(i).is_some_and(u8::is_ascii_digit) {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        return Some(i);
    }
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
        i += 1;
    }
    if b.get(i) != Some(&b'$') {
        return Some(start + 1);
    }
    let tag = &b[start..=i];
    let body = i + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map(|p| body + p + tag.len())
}

#[cfg(test)]
mod tests {
    use super::shape_key;

    #[test]
    fn numbers_are_blanked_and_nothing_else() {
        assert_eq!(
            shape_key("SELECT abalance FROM pgbench_accounts WHERE aid = 41327;").as_deref(),
            Some("\0SELECT abalance FROM pgbench_accounts WHERE aid = \u{1};")
        );
        assert_eq!(
            shape_key("select t1.x, 1.5e-3, .5 from t1 where y = $1 limit 10").as_deref(),
            Some("\0select t1.x, \u{1}, \u{1} from t1 where y = $1 limit \u{1}")
        );
        assert_eq!(
            shape_key("select 'a 1', \"c2\", $q$ 3 $q$ -- 4\n /* 5 */"),
            None
        );
        assert_eq!(shape_key("select E'\\' 1'"), None);
        assert_eq!(shape_key("select '1"), None, "unterminated");
    }
}
