//! Messages a client sends that the proxy looks inside, as borrowed views of a frame body.

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

/// Query (`Q`): one or more statements in the simple query protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    /// The query string.
    pub sql: &'a str,
}

impl<'a> Query<'a> {
    /// Parses a `Q` frame.
    pub fn parse(frame: &'a Frame) -> Result<Query<'a>, WireError> {
        expect(frame, b'Q')?;
        let mut c = Cursor::new(frame.body(), "Query");
        let sql = c.cstr()?;
        c.finish()?;
        Ok(Query { sql })
    }

    /// A `Q` frame for `sql`.
    pub fn frame(sql: &str) -> Frame {
        let mut body = Vec::with_capacity(sql.len() + 1);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        Frame::new(b'Q', &body)
    }
}

/// Parse (`P`): prepares a statement under a name ("" is the unnamed statement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Statement name; empty for the unnamed statement.
    pub name: &'a str,
    /// The statement text (one statement).
    pub sql: &'a str,
    /// Parameter type OIDs the client specified (0 = let the server infer).
    pub param_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    /// Parses a `P` frame. (The message is called Parse in the protocol; every message type
    /// here reads itself with `parse`.)
    #[allow(clippy::self_named_constructors)]
    pub fn parse(frame: &'a Frame) -> Result<Parse<'a>, WireError> {
        expect(frame, b'P')?;
        let mut c = Cursor::new(frame.body(), "Parse");
        let name = c.cstr()?;
        let sql = c.cstr()?;
        let n = c.count(4)?;
        let mut param_types = Vec::with_capacity(n);
        for _ in 0..n {
            param_types.push(c.i32()? as u32);
        }
        c.finish()?;
        Ok(Parse {
            name,
            sql,
            param_types,
        })
    }
}

/// Bind (`B`): makes a portal from a prepared statement and parameter values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Portal name; empty for the unnamed portal.
    pub portal: &'a str,
    /// Source statement name.
    pub statement: &'a str,
    /// Format codes of the parameters: none (all text), one (for all) or one each.
    pub param_formats: Vec<i16>,
    /// Parameter values; `None` is SQL NULL.
    pub params: Vec<Option<&'a [u8]>>,
    /// Format codes of the result columns, in the same none/one/each scheme.
    pub result_formats: Vec<i16>,
}

impl<'a> Bind<'a> {
    /// Parses a `B` frame.
    pub fn parse(frame: &'a Frame) -> Result<Bind<'a>, WireError> {
        expect(frame, b'B')?;
        let mut c = Cursor::new(frame.body(), "Bind");
        let portal = c.cstr()?;
        let statement = c.cstr()?;
        let n = c.count(2)?;
        let mut param_formats = Vec::with_capacity(n);
        for _ in 0..n {
            param_formats.push(format_code(&mut c)?);
        }
        let n = c.count(4)?;
        let mut params = Vec::with_capacity(n);
        for _ in 0..n {
            params.push(c.value()?);
        }
        let n = c.count(2)?;
        let mut result_formats = Vec::with_capacity(n);
        for _ in 0..n {
            result_formats.push(format_code(&mut c)?);
        }
        c.finish()?;
        if param_formats.len() > 1 && param_formats.len() != params.len() {
            return Err(c.invalid(format!(
                "{} parameter format codes for {} parameters",
                param_formats.len(),
                params.len()
            )));
        }
        Ok(Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }

    /// The format of parameter `i`: 0 text, 1 binary.
    pub fn param_format(&self, i: usize) -> i16 {
        pick_format(&self.param_formats, i)
    }

    /// The format of result column `i` of the portal: 0 text, 1 binary.
    pub fn result_format(&self, i: usize) -> i16 {
        pick_format(&self.result_formats, i)
    }
}

/// The none/one/each convention of format code lists.
fn pick_format(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        each => each.get(i).copied().unwrap_or(0),
    }
}

fn format_code(c: &mut Cursor<'_>) -> Result<i16, WireError> {
    match c.i16()? {
        f @ (0 | 1) => Ok(f),
        other => Err(c.invalid(format!("format code {other}"))),
    }
}

/// Execute (`E`): runs a portal, up to `max_rows` rows (0 = all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    /// Portal name.
    pub portal: &'a str,
    /// Row limit; 0 means no limit.
    pub max_rows: i32,
}

impl<'a> Execute<'a> {
    /// Parses an `E` frame.
    pub fn parse(frame: &'a Frame) -> Result<Execute<'a>, WireError> {
        expect(frame, b'E')?;
        let mut c = Cursor::new(frame.body(), "Execute");
        let portal = c.cstr()?;
        let max_rows = c.i32()?;
        c.finish()?;
        Ok(Execute { portal, max_rows })
    }

    /// An `E` frame.
    pub fn frame(portal: &str, max_rows: i32) -> Frame {
        let mut body = Vec::with_capacity(portal.len() + 5);
        body.extend_from_slice(portal.as_bytes());
        body.push(0);
        body.extend_from_slice(&max_rows.to_be_bytes());
        Frame::new(b'E', &body)
    }
}

/// What Describe and Close name: a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `S`: a prepared statement.
    Statement(&'a str),
    /// `P`: a portal.
    Portal(&'a str),
}

fn target<'a>(c: &mut Cursor<'a>) -> Result<Target<'a>, WireError> {
    let kind = c.u8()?;
    let name = c.cstr()?;
    c.finish()?;
    match kind {
        b'S' => Ok(Target::Statement(name)),
        b'P' => Ok(Target::Portal(name)),
        other => Err(c.invalid(format!("target kind {:?}", char::from(other)))),
    }
}

/// Describe (`D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Describe<'a> {
    /// What to describe.
    pub target: Target<'a>,
}

impl<'a> Describe<'a> {
    /// Parses a `D` frame sent by a client.
    pub fn parse(frame: &'a Frame) -> Result<Describe<'a>, WireError> {
        expect(frame, b'D')?;
        let mut c = Cursor::new(frame.body(), "Describe");
        Ok(Describe {
            target: target(&mut c)?,
        })
    }
}

/// Close (`C`) sent by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close<'a> {
    /// What to close.
    pub target: Target<'a>,
}

impl<'a> Close<'a> {
    /// Parses a `C` frame sent by a client.
    pub fn parse(frame: &'a Frame) -> Result<Close<'a>, WireError> {
        expect(frame, b'C')?;
        let mut c = Cursor::new(frame.body(), "Close");
        Ok(Close {
            target: target(&mut c)?,
        })
    }
}

/// The body of a PasswordMessage (`p`) carrying a cleartext password.
pub fn password(frame: &Frame) -> Result<&str, WireError> {
    expect(frame, b'p')?;
    let mut c = Cursor::new(frame.body(), "PasswordMessage");
    let p = c.cstr()?;
    c.finish()?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_frame() -> Frame {
        let mut b = Vec::new();
        b.extend_from_slice(b"p1\0s1\0");
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        Frame::new(b'B', &b)
    }

    #[test]
    fn parses_bind() {
        let f = bind_frame();
        let b = Bind::parse(&f).expect("bind");
        assert_eq!((b.portal, b.statement), ("p1", "s1"));
        assert_eq!(b.params, vec![Some(&7i32.to_be_bytes()[..]), None]);
        assert_eq!((b.param_format(1), b.result_format(3)), (1, 0));
    }

    #[test]
    fn refuses_a_bind_with_a_lying_count() {
        let f = bind_frame();
        let mut body = f.body().to_vec();
        body[8] = 0x40; // parameter count 0x4002
        assert!(Bind::parse(&Frame::new(b'B', &body)).is_err());
    }

    #[test]
    fn parses_parse_execute_describe_close() {
        let mut p = b"s1\0select $1\0".to_vec();
        p.extend_from_slice(&1i16.to_be_bytes());
        p.extend_from_slice(&23i32.to_be_bytes());
        let f = Frame::new(b'P', &p);
        let parsed = Parse::parse(&f).expect("parse");
        assert_eq!(
            (parsed.name, parsed.sql, parsed.param_types),
            ("s1", "select $1", vec![23])
        );
        let e = Execute::frame("p", 10);
        assert_eq!(
            Execute::parse(&e).expect("execute"),
            Execute {
                portal: "p",
                max_rows: 10
            }
        );
        let d = Frame::new(b'D', b"Sname\0");
        assert_eq!(
            Describe::parse(&d).expect("describe").target,
            Target::Statement("name")
        );
        assert!(Close::parse(&Frame::new(b'C', b"Xname\0")).is_err());
        assert_eq!(
            Query::parse(&Query::frame("select 1")).expect("query").sql,
            "select 1"
        );
    }
}
