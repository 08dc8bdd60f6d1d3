//! Messages a server sends that the proxy looks inside or writes itself.

use crate::{Cursor, Frame, WireError};

fn expect(frame: &Frame, tag: u8) -> Result<(), WireError> {
    if frame.tag() == tag {
        Ok(())
    } else {
        Err(WireError::UnexpectedTag {
            expected: char::from(tag),
            got: char::from(frame.tag()),
        })
    }
}

/// One column of a RowDescription. `table_oid` and `column` say where the value came
/// from (0 when it is computed): the proxy masks by source even under an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// Column name as the client sees it (maybe an alias).
    pub name: String,
    /// OID of the source table, or 0.
    pub table_oid: u32,
    /// Attribute number in the source table, or 0.
    pub column: i16,
    /// OID of the data type.
    pub type_oid: u32,
    /// `pg_type.typlen`.
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// RowDescription (`T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDescription {
    /// The result columns, in order.
    pub fields: Vec<FieldDescription>,
}

impl RowDescription {
    /// Parses a `T` frame.
    pub fn parse(frame: &Frame) -> Result<RowDescription, WireError> {
        expect(frame, b'T')?;
        let mut c = Cursor::new(frame.body(), "RowDescription");
        let n = c.count(19)?;
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            let name = String::from_utf8_lossy(c.cstr_bytes()?).into_owned();
            fields.push(FieldDescription {
                name,
                table_oid: c.i32()? as u32,
                column: c.i16()?,
                type_oid: c.i32()? as u32,
                type_size: c.i16()?,
                type_modifier: c.i32()?,
                format: c.i16()?,
            });
        }
        c.finish()?;
        Ok(RowDescription { fields })
    }
}

/// DataRow (`D` from a server): the cells of one row; `None` is NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRow<'a> {
    /// Cell values in column order.
    pub cells: Vec<Option<&'a [u8]>>,
}

impl<'a> DataRow<'a> {
    /// Parses a server's `D` frame.
    pub fn parse(frame: &'a Frame) -> Result<DataRow<'a>, WireError> {
        expect(frame, b'D')?;
        let mut c = Cursor::new(frame.body(), "DataRow");
        let n = c.count(4)?;
        let mut cells = Vec::with_capacity(n);
        for _ in 0..n {
            cells.push(c.value()?);
        }
        c.finish()?;
        Ok(DataRow { cells })
    }

    /// A `D` frame holding `cells`.
    pub fn frame<C: AsRef<[u8]>>(cells: &[Option<C>]) -> Frame {
        let len: usize = cells
            .iter()
            .map(|c| 4 + c.as_ref().map_or(0, |v| v.as_ref().len()))
            .sum();
        let mut body = Vec::with_capacity(2 + len);
        body.extend_from_slice(&(cells.len() as i16).to_be_bytes());
        for cell in cells {
            match cell {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    let v = v.as_ref();
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
            }
        }
        Frame::new(b'D', &body)
    }
}

/// CommandComplete (`C` from a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandComplete<'a> {
    /// The command tag, e.g. `SELECT 3`, `INSERT 0 1`.
    pub tag: &'a str,
}

impl<'a> CommandComplete<'a> {
    /// Parses a server's `C` frame.
    pub fn parse(frame: &'a Frame) -> Result<CommandComplete<'a>, WireError> {
        expect(frame, b'C')?;
        let mut c = Cursor::new(frame.body(), "CommandComplete");
        let tag = c.cstr()?;
        c.finish()?;
        Ok(CommandComplete { tag })
    }

    /// Rows the command returned or touched, from the last word of its tag, if it has one.
    pub fn rows(&self) -> Option<u64> {
        self.tag.rsplit(' ').next().and_then(|n| n.parse().ok())
    }
}

/// The fields of an ErrorResponse (`E`) or NoticeResponse (`N`) the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`: ERROR, FATAL, PANIC, WARNING, NOTICE, ...
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
    /// `D`: detail, if any.
    pub detail: Option<String>,
    /// `H`: hint, if any.
    pub hint: Option<String>,
}

impl ErrorFields {
    /// Parses an `E` or `N` frame.
    pub fn parse(frame: &Frame) -> Result<ErrorFields, WireError> {
        if frame.tag() != b'E' && frame.tag() != b'N' {
            return Err(WireError::UnexpectedTag {
                expected: 'E',
                got: char::from(frame.tag()),
            });
        }
        let mut c = Cursor::new(frame.body(), "ErrorResponse");
        let mut out = ErrorFields::default();
        loop {
            let kind = c.u8()?;
            if kind == 0 {
                break;
            }
            let value = String::from_utf8_lossy(c.cstr_bytes()?).into_owned();
            match kind {
                b'S' => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                b'D' => out.detail = Some(value),
                b'H' => out.hint = Some(value),
                _ => {}
            }
        }
        c.finish()?;
        Ok(out)
    }
}

/// The transaction status a ReadyForQuery (`Z`) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (statements refused until its end).
    Failed,
}

impl TransactionStatus {
    /// Parses a `Z` frame.
    pub fn parse(frame: &Frame) -> Result<TransactionStatus, WireError> {
        expect(frame, b'Z')?;
        let mut c = Cursor::new(frame.body(), "ReadyForQuery");
        let status = match c.u8()? {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            other => return Err(c.invalid(format!("status {:?}", char::from(other)))),
        };
        c.finish()?;
        Ok(status)
    }

    /// The status byte.
    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// BackendKeyData (`K`): the key a client needs to cancel this session's queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKeyData {
    /// Backend process id.
    pub process_id: i32,
    /// Secret key.
    pub secret_key: i32,
}

impl BackendKeyData {
    /// Parses a `K` frame.
    pub fn parse(frame: &Frame) -> Result<BackendKeyData, WireError> {
        expect(frame, b'K')?;
        let mut c = Cursor::new(frame.body(), "BackendKeyData");
        let process_id = c.i32()?;
        let secret_key = c.i32()?;
        c.finish()?;
        Ok(BackendKeyData {
            process_id,
            secret_key,
        })
    }

    /// The `K` frame.
    pub fn frame(&self) -> Frame {
        let mut body = [0u8; 8];
        body[..4].copy_from_slice(&self.process_id.to_be_bytes());
        body[4..].copy_from_slice(&self.secret_key.to_be_bytes());
        Frame::new(b'K', &body)
    }
}

/// CopyInResponse (`G`), CopyOutResponse (`H`) or CopyBothResponse (`W`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// 0 textual (text or csv), 1 binary.
    pub format: i8,
    /// Per-column format codes.
    pub column_formats: Vec<i16>,
}

impl CopyResponse {
    /// Parses a `G`, `H` or `W` frame.
    pub fn parse(frame: &Frame) -> Result<CopyResponse, WireError> {
        if !matches!(frame.tag(), b'G' | b'H' | b'W') {
            return Err(WireError::UnexpectedTag {
                expected: 'H',
                got: char::from(frame.tag()),
            });
        }
        let mut c = Cursor::new(frame.body(), "CopyResponse");
        let format = c.u8()? as i8;
        let n = c.count(2)?;
        let mut column_formats = Vec::with_capacity(n);
        for _ in 0..n {
            column_formats.push(c.i16()?);
        }
        c.finish()?;
        Ok(CopyResponse {
            format,
            column_formats,
        })
    }
}

/// Builders for the messages the proxy writes to a client itself.
pub mod build {
    use crate::{Frame, TransactionStatus};

    fn error_like(tag: u8, severity: &str, code: &str, message: &str, hint: Option<&str>) -> Frame {
        let mut body = Vec::with_capacity(message.len() + 64);
        for (kind, value) in [
            (b'S', Some(severity)),
            (b'V', Some(severity)),
            (b'C', Some(code)),
            (b'M', Some(message)),
            (b'H', hint),
        ] {
            if let Some(v) = value {
                body.push(kind);
                // A NUL inside a field would end it early and corrupt the message.
                body.extend(v.bytes().map(|b| if b == 0 { b' ' } else { b }));
                body.push(0);
            }
        }
        body.push(0);
        Frame::new(tag, &body)
    }

    /// ErrorResponse (`E`). `severity` is ERROR (the statement fails, the session goes
    /// on) or FATAL (the session ends).
    pub fn error(severity: &str, code: &str, message: &str, hint: Option<&str>) -> Frame {
        error_like(b'E', severity, code, message, hint)
    }

    /// NoticeResponse (`N`) with severity NOTICE.
    pub fn notice(code: &str, message: &str, hint: Option<&str>) -> Frame {
        error_like(b'N', "NOTICE", code, message, hint)
    }

    /// AuthenticationOk.
    pub fn authentication_ok() -> Frame {
        Frame::new(b'R', &0i32.to_be_bytes())
    }

    /// AuthenticationCleartextPassword: the agent's token comes as the password.
    pub fn authentication_cleartext() -> Frame {
        Frame::new(b'R', &3i32.to_be_bytes())
    }

    /// ReadyForQuery.
    pub fn ready_for_query(status: TransactionStatus) -> Frame {
        Frame::new(b'Z', &[status.byte()])
    }

    /// ParameterStatus.
    pub fn parameter_status(name: &str, value: &str) -> Frame {
        let mut body = Vec::with_capacity(name.len() + value.len() + 2);
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
        Frame::new(b'S', &body)
    }

    /// CommandComplete with `tag`.
    pub fn command_complete(tag: &str) -> Frame {
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        Frame::new(b'C', &body)
    }

    /// Sync (`S` from a client), for the proxy's own extended-protocol exchanges.
    pub fn sync() -> Frame {
        Frame::new(b'S', &[])
    }

    /// Terminate (`X`).
    pub fn terminate() -> Frame {
        Frame::new(b'X', &[])
    }

    /// PasswordMessage (`p`) with a cleartext or MD5 password, for the upstream.
    pub fn password(password: &[u8]) -> Frame {
        let mut body = password.to_vec();
        body.push(0);
        Frame::new(b'p', &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let f = build::error("ERROR", "42501", "denied\0by policy", Some("ask"));
        let e = ErrorFields::parse(&f).expect("fields");
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "denied by policy");
        assert_eq!(e.hint.as_deref(), Some("ask"));
    }

    #[test]
    fn data_row_round_trip() {
        let f = DataRow::frame(&[Some(&b"a"[..]), None, Some(&b""[..])]);
        let row = DataRow::parse(&f).expect("row");
        assert_eq!(row.cells, vec![Some(&b"a"[..]), None, Some(&b""[..])]);
    }

    #[test]
    fn command_complete_rows() {
        let f = build::command_complete("INSERT 0 12");
        assert_eq!(CommandComplete::parse(&f).expect("cc").rows(), Some(12));
        let f = build::command_complete("BEGIN");
        assert_eq!(CommandComplete::parse(&f).expect("cc").rows(), None);
    }

    #[test]
    fn row_description_with_a_lying_count_is_refused() {
        let mut body = 100i16.to_be_bytes().to_vec();
        body.extend_from_slice(b"a\0");
        assert!(RowDescription::parse(&Frame::new(b'T', &body)).is_err());
    }
}
