//! Why a text could not be classified, and where in it PostgreSQL's grammar gave up.

/// Why SQL text could not be classified. Every variant means "deny": the proxy answers the
/// agent with an `ErrorResponse` carrying [`ClassifyError::sqlstate`], the `Display` text as
/// its message and, for a parse error, [`ClassifyError::position`] as its `P` field, so that
/// `psql` and drivers point at the offending spot exactly as they would for the server's own
/// error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// The PostgreSQL grammar rejects the text. The server would reject it too, so denying
    /// costs the agent nothing but makes sure no text the classifier could not read reaches
    /// the server.
    #[error("agentgate could not parse this SQL: {message}")]
    Parse {
        /// PostgreSQL's own message, e.g. `syntax error at or near "FORM"`.
        message: String,
        /// Where the error is, as PostgreSQL reports it in an `ErrorResponse`'s `P` field:
        /// a 1-based index in characters (not bytes) into the text. `None` when it could not
        /// be pinned down.
        position: Option<usize>,
    },
    /// The text is longer than [`crate::MAX_SQL_LEN`]. Classifying has to parse the whole
    /// text before anything is forwarded, so the bound keeps one agent from making the proxy
    /// parse (and hold) arbitrarily large inputs.
    #[error(
        "agentgate refuses SQL of {len} bytes: the limit is {max} bytes per query; \
         load bulk data with COPY … FROM STDIN instead"
    )]
    TooLong {
        /// The length of the refused text, in bytes.
        len: usize,
        /// The limit it exceeded, in bytes.
        max: usize,
    },
    /// The statement parses but nests deeper than the classifier can walk (about 20 levels
    /// of subqueries, or a very long chain of operators). Denied rather than classified from
    /// a partial view.
    #[error(
        "agentgate cannot classify this SQL: it nests too deeply ({message}); \
         split it into simpler statements"
    )]
    TooComplex {
        /// What gave up, for the operator's logs.
        message: String,
    },
}

impl ClassifyError {
    /// The SQLSTATE the proxy's `ErrorResponse` should carry: `42601` (syntax_error) for a
    /// parse error, `54000` (program_limit_exceeded) for a text too long, `54001`
    /// (statement_too_complex) for one too deep. Clients and drivers branch on these codes,
    /// so they are the ones PostgreSQL itself uses for the same conditions.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ClassifyError::Parse { .. } => "42601",
            ClassifyError::TooLong { .. } => "54000",
            ClassifyError::TooComplex { .. } => "54001",
        }
    }

    /// The `ErrorResponse` `P` field (1-based character index into the query), when known.
    pub fn position(&self) -> Option<usize> {
        match self {
            ClassifyError::Parse { position, .. } => *position,
            _ => None,
        }
    }
}

/// Up to this input length a parse error is located exactly by re-parsing prefixes
/// (a binary search costing about log2(tokens) parses); beyond it, by the text of the message
/// alone, so that garbage input cannot make the proxy parse megabytes twenty times over.
const EXACT_LOCATE_MAX_LEN: usize = 64 * 1024;

/// Turns a pg_query error for `sql` into a [`ClassifyError`].
pub(crate) fn from_pg_query(sql: &str, error: pg_query::Error) -> ClassifyError {
    match error {
        pg_query::Error::Decode(decode) => ClassifyError::TooComplex {
            message: decode.to_string(),
        },
        pg_query::Error::Parse(message) if message.contains("stack depth limit exceeded") => {
            ClassifyError::TooComplex { message }
        }
        pg_query::Error::Parse(message) => {
            let offset = locate(sql, &message);
            ClassifyError::Parse {
                position: offset.map(|offset| char_position(sql, offset)),
                message,
            }
        }
        pg_query::Error::Conversion(nul) => ClassifyError::Parse {
            message: "the text contains a NUL byte".to_owned(),
            position: Some(char_position(sql, nul.nul_position())),
        },
        other => ClassifyError::Parse {
            message: other.to_string(),
            position: None,
        },
    }
}

/// The 1-based character position of byte `offset` in `sql` (PostgreSQL's cursor position).
pub(crate) fn char_position(sql: &str, offset: usize) -> usize {
    let offset = offset.min(sql.len());
    sql.char_indices()
        .take_while(|(index, _)| *index < offset)
        .count()
        + 1
}

/// The byte offset at which PostgreSQL reports `message` for `sql`.
///
/// pg_query does not pass libpg_query's cursor position through, so it is recovered here.
/// The grammar rejects the first token that cannot continue a valid prefix, so a prefix of
/// the text that stops before that token fails only with "at end of input" (or parses), and
/// every prefix that includes it fails otherwise: a binary search over token ends finds the
/// token. Lexer errors (an unterminated string) and long inputs fall back to the text quoted
/// in the message.
fn locate(sql: &str, message: &str) -> Option<usize> {
    if message.ends_with("at end of input") {
        return Some(sql.len());
    }
    if sql.len() <= EXACT_LOCATE_MAX_LEN
        && let Some(offset) = locate_by_prefixes(sql)
    {
        return Some(offset);
    }
    locate_by_message(sql, message)
}

fn locate_by_prefixes(sql: &str) -> Option<usize> {
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let fails_here = |end: i32| -> Option<bool> {
        let prefix = sql.get(..usize::try_from(end).ok()?)?;
        Some(match pg_query::parse(prefix, 0) {
            Ok(_) => false,
            Err(pg_query::Error::Parse(message)) => !message.ends_with("at end of input"),
            Err(_) => true,
        })
    };
    // Find the first token whose prefix fails; the whole text fails by assumption.
    let (mut low, mut high) = (0usize, tokens.len());
    while low < high {
        let middle = low + (high - low) / 2;
        if fails_here(tokens[middle].end)? {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    let token = tokens.get(low)?;
    usize::try_from(token.start).ok()
}

fn locate_by_message(sql: &str, message: &str) -> Option<usize> {
    const NEAR: &str = "at or near \"";
    let start = message.find(NEAR)? + NEAR.len();
    let near = message[start..].strip_suffix('"')?;
    if near.is_empty() {
        return None;
    }
    // An unterminated string or comment is reported from its start to the end of input.
    if sql.ends_with(near) {
        return Some(sql.len() - near.len());
    }
    sql.find(near)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position_of(sql: &str) -> Option<usize> {
        match pg_query::parse(sql, 0) {
            Ok(_) => panic!("{sql:?} parsed"),
            Err(error) => from_pg_query(sql, error).position(),
        }
    }

    #[test]
    fn positions_match_postgres_cursor() {
        // Positions as psql shows them for the same errors against a real server.
        assert_eq!(position_of("SELECT 1; selec 2"), Some(11));
        assert_eq!(position_of("select * form t"), Some(10));
        assert_eq!(position_of("select 'abc"), Some(8));
        assert_eq!(position_of("select (1"), Some(10));
        assert_eq!(position_of("sélect 1"), Some(1));
        assert_eq!(position_of("select 'é' 'x'"), Some(12));
        assert_eq!(position_of("  select 1 +   "), Some(16));
    }

    #[test]
    fn char_position_counts_characters() {
        assert_eq!(char_position("héllo", 0), 1);
        assert_eq!(char_position("héllo", 3), 3);
        assert_eq!(char_position("héllo", 99), 6);
    }
}
