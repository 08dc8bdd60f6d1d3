//! Fuzz target `frames`: arbitrary bytes as a stream of regular (tagged) messages.
//!
//! The stream is split four ways and each must agree with a plain reference model of the
//! framing rules: `FrameCodec::decode` over the whole buffer, `decode` fed in small chunks,
//! `FrameReader` over a reader that returns small chunks, and a codec with a tiny limit.
//! Every frame is then handed to every body parser; a parser for another tag must refuse
//! it with `UnexpectedTag`, and what parses is rebuilt with the crate's own builders (where
//! it has them) and must come out byte for byte the same. Any panic is a finding.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use agentgate_pgwire::{
    BackendKeyData, Bind, Close, CommandComplete, CopyResponse, DataRow, Describe, ErrorFields,
    Execute, Frame, FrameCodec, FrameReader, Parse, Query, RowDescription, Target,
    TransactionStatus, WireError, build, password,
};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Decoder, Encoder};

/// The limit the main passes use: small, so declared lengths above it are easy to reach.
const MAX: usize = 64 * 1024;

/// What a stream decodes to: its frames, then the error that stopped it, if any.
type Outcome = (Vec<Frame>, Option<WireError>);

fuzz_target!(|data: &[u8]| {
    // Chunk size and the tiny limit come from the input's first bytes, but the whole input
    // is the stream, so seeds made of real messages are real streams.
    let chunk = 1 + usize::from(data.first().copied().unwrap_or(0) % 17);
    let tiny = usize::from(data.get(1).copied().unwrap_or(0));

    let expected = model(data, MAX);
    assert_same("decode (whole buffer)", &decode_all(data, MAX), &expected);
    assert_same(
        "decode (chunked)",
        &decode_chunked(data, MAX, chunk),
        &expected,
    );
    assert_same("FrameReader", &read_all(data, MAX, chunk), &expected);
    assert_same(
        "decode (tiny limit)",
        &decode_all(data, tiny),
        &model(data, tiny),
    );

    for frame in &expected.0 {
        check_frame(frame);
        check_parsers(frame);
    }
});

/// The framing rules, written plainly: tag, Int32 length counting itself (at least 4, at
/// most `max`), body. A stream that stops inside a message is an I/O error at its end.
fn model(data: &[u8], max: usize) -> Outcome {
    let mut frames = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return (frames, None);
        }
        if rest.len() < 5 {
            return (frames, Some(WireError::Io(String::new())));
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return (frames, Some(WireError::BadLength(i64::from(len))));
        }
        let len = len as usize;
        if len > max {
            return (frames, Some(WireError::TooLong { len, max }));
        }
        if rest.len() < len + 1 {
            return (frames, Some(WireError::Io(String::new())));
        }
        let (head, tail) = rest.split_at(len + 1);
        frames.push(Frame::from_raw(Bytes::copy_from_slice(head)).expect("model frame"));
        rest = tail;
    }
}

/// Equal outcomes; I/O errors compare by kind only (their text is for people).
fn assert_same(what: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: frame count");
    for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
        assert_eq!(g.raw(), w.raw(), "{what}: frame {i}");
    }
    let same_error = match (&got.1, &want.1) {
        (Some(WireError::Io(_)), Some(WireError::Io(_))) => true,
        (g, w) => g == w,
    };
    assert!(same_error, "{what}: got {:?}, want {:?}", got.1, want.1);
}

fn decode_all(data: &[u8], max: usize) -> Outcome {
    let mut codec = FrameCodec::new(max);
    assert_eq!(codec.max_len(), max);
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => return (frames, Some(e)),
        }
        check_buffer(&buf, max, data.len());
    }
    check_buffer(&buf, max, data.len());
    match codec.decode_eof(&mut buf) {
        Ok(Some(f)) => panic!("decode_eof found a frame decode missed: {f:?}"),
        Ok(None) => {
            assert!(buf.is_empty(), "clean end with {} bytes left", buf.len());
            (frames, None)
        }
        Err(e) => (frames, Some(e)),
    }
}

fn decode_chunked(data: &[u8], max: usize, chunk: usize) -> Outcome {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        check_buffer(&buf, max, data.len());
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// The codec reserves room for at most one message within the limit, never for a larger
/// declared length: the buffer stays within a small multiple of limit plus input.
fn check_buffer(buf: &BytesMut, max: usize, input: usize) {
    let bound = 2 * (max + 5) + input + 64 * 1024;
    assert!(
        buf.capacity() <= bound,
        "buffer capacity {} above {bound} (limit {max}, input {input})",
        buf.capacity()
    );
}

/// An in-memory socket that hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

fn read_all(data: &[u8], max: usize, chunk: usize) -> Outcome {
    runtime().block_on(async {
        let mut reader = FrameReader::new(Chunked { data, chunk }, FrameCodec::new(max));
        let mut frames = Vec::new();
        loop {
            match reader.read_frame().await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    assert_eq!(reader.buffered(), 0, "clean end with bytes buffered");
                    let rest = reader
                        .into_inner()
                        .expect("into_inner with nothing buffered");
                    assert!(rest.data.is_empty(), "clean end before the input's end");
                    return (frames, None);
                }
                Err(e) => {
                    if reader.buffered() > 0 {
                        assert!(
                            reader.into_inner().is_err(),
                            "into_inner with bytes buffered"
                        );
                    }
                    return (frames, Some(e));
                }
            }
        }
    })
}

/// What holds for any frame: the accessors agree, `from_raw` and `new` rebuild it, the
/// encoder writes it unchanged.
fn check_frame(frame: &Frame) {
    let raw = frame.raw().clone();
    assert!(raw.len() >= 5 && raw.len() - 1 <= MAX);
    assert_eq!(frame.wire_len(), raw.len());
    assert_eq!(frame.tag(), raw[0]);
    assert_eq!(frame.body(), &raw[5..]);
    assert_eq!(
        &Frame::from_raw(raw.clone()).expect("from_raw of a decoded frame"),
        frame
    );
    assert_eq!(&Frame::new(frame.tag(), frame.body()), frame);
    let mut out = BytesMut::new();
    FrameCodec::new(MAX)
        .encode(frame.clone(), &mut out)
        .expect("encode");
    assert_eq!(&out[..], &raw[..]);
    // Debug never prints the body; it must not panic either.
    let shown = format!("{frame:?}");
    assert!(shown.starts_with("Frame("));
}

/// A parser's answer to a frame of another tag must be `UnexpectedTag`.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, WireError>) {
    match r {
        Err(WireError::UnexpectedTag { .. }) => {}
        other => panic!("{what} on a foreign tag: {other:?}"),
    }
}

fn check_parsers(frame: &Frame) {
    let tag = frame.tag();
    let body = frame.body();

    // Frontend messages.
    match Query::parse(frame) {
        Ok(q) => assert_eq!(&Query::frame(q.sql), frame, "Query rebuild"),
        r if tag != b'Q' => refused("Query", r),
        Err(e) => assert_wire_error(&e),
    }
    match Parse::parse(frame) {
        Ok(p) => {
            assert!(p.param_types.len() * 4 <= body.len());
            let mut b = Vec::new();
            b.extend_from_slice(p.name.as_bytes());
            b.push(0);
            b.extend_from_slice(p.sql.as_bytes());
            b.push(0);
            b.extend_from_slice(&(p.param_types.len() as i16).to_be_bytes());
            for t in &p.param_types {
                b.extend_from_slice(&t.to_be_bytes());
            }
            assert_eq!(b, body, "Parse rebuild");
        }
        r if tag != b'P' => refused("Parse", r),
        Err(e) => assert_wire_error(&e),
    }
    match Bind::parse(frame) {
        Ok(b) => {
            assert!(b.param_formats.len() <= 1 || b.param_formats.len() == b.params.len());
            for i in 0..=b.params.len() + 1 {
                assert!(matches!(b.param_format(i), 0 | 1));
            }
            for i in 0..=b.result_formats.len() + 1 {
                assert!(matches!(b.result_format(i), 0 | 1));
            }
            let mut r = Vec::new();
            for s in [b.portal, b.statement] {
                r.extend_from_slice(s.as_bytes());
                r.push(0);
            }
            r.extend_from_slice(&(b.param_formats.len() as i16).to_be_bytes());
            for f in &b.param_formats {
                r.extend_from_slice(&f.to_be_bytes());
            }
            r.extend_from_slice(&(b.params.len() as i16).to_be_bytes());
            for p in &b.params {
                put_value(&mut r, *p);
            }
            r.extend_from_slice(&(b.result_formats.len() as i16).to_be_bytes());
            for f in &b.result_formats {
                r.extend_from_slice(&f.to_be_bytes());
            }
            assert_eq!(r, body, "Bind rebuild");
        }
        r if tag != b'B' => refused("Bind", r),
        Err(e) => assert_wire_error(&e),
    }
    match Execute::parse(frame) {
        Ok(e) => assert_eq!(
            &Execute::frame(e.portal, e.max_rows),
            frame,
            "Execute rebuild"
        ),
        r if tag != b'E' => refused("Execute", r),
        Err(e) => assert_wire_error(&e),
    }
    match Describe::parse(frame) {
        Ok(d) => assert_eq!(target_body(d.target), body, "Describe rebuild"),
        r if tag != b'D' => refused("Describe", r),
        Err(e) => assert_wire_error(&e),
    }
    match Close::parse(frame) {
        Ok(c) => assert_eq!(target_body(c.target), body, "Close rebuild"),
        r if tag != b'C' => refused("Close", r),
        Err(e) => assert_wire_error(&e),
    }
    match password(frame) {
        Ok(p) => assert_eq!(&build::password(p.as_bytes()), frame, "password rebuild"),
        r if tag != b'p' => refused("password", r),
        Err(e) => assert_wire_error(&e),
    }

    // Backend messages.
    match RowDescription::parse(frame) {
        Ok(rd) => {
            assert!(rd.fields.len() * 19 <= body.len());
            for f in &rd.fields {
                assert!(!f.name.contains('\0'));
            }
        }
        r if tag != b'T' => refused("RowDescription", r),
        Err(e) => assert_wire_error(&e),
    }
    match DataRow::parse(frame) {
        Ok(row) => {
            let again = DataRow::frame(&row.cells);
            assert_eq!(&again, frame, "DataRow rebuild");
            let reparsed = DataRow::parse(&again).expect("DataRow re-parse");
            assert_eq!(reparsed, row, "DataRow round trip");
        }
        r if tag != b'D' => refused("DataRow", r),
        Err(e) => assert_wire_error(&e),
    }
    match CommandComplete::parse(frame) {
        Ok(cc) => {
            assert_eq!(
                &build::command_complete(cc.tag),
                frame,
                "CommandComplete rebuild"
            );
            if let Some(n) = cc.rows() {
                assert!(cc.tag.ends_with(&n.to_string()) || cc.tag.ends_with('0'));
            }
        }
        r if tag != b'C' => refused("CommandComplete", r),
        Err(e) => assert_wire_error(&e),
    }
    match ErrorFields::parse(frame) {
        Ok(e) => {
            // The builder writes S, V, C, M and H; what it wrote must read back the same.
            let again = build::error(&e.severity, &e.code, &e.message, e.hint.as_deref());
            let back = ErrorFields::parse(&again).expect("ErrorFields re-parse");
            assert_eq!(
                (&back.severity, &back.code, &back.message, &back.hint),
                (&e.severity, &e.code, &e.message, &e.hint),
                "ErrorFields round trip"
            );
            assert_eq!(back.detail, None);
            let notice = build::notice(&e.code, &e.message, e.hint.as_deref());
            let back = ErrorFields::parse(&notice).expect("notice re-parse");
            assert_eq!((back.severity.as_str(), &back.code), ("NOTICE", &e.code));
        }
        r if tag != b'E' && tag != b'N' => refused("ErrorFields", r),
        Err(e) => assert_wire_error(&e),
    }
    match TransactionStatus::parse(frame) {
        Ok(s) => assert_eq!(&build::ready_for_query(s), frame, "ReadyForQuery rebuild"),
        r if tag != b'Z' => refused("TransactionStatus", r),
        Err(e) => assert_wire_error(&e),
    }
    match BackendKeyData::parse(frame) {
        Ok(k) => assert_eq!(&k.frame(), frame, "BackendKeyData rebuild"),
        r if tag != b'K' => refused("BackendKeyData", r),
        Err(e) => assert_wire_error(&e),
    }
    match CopyResponse::parse(frame) {
        Ok(cr) => {
            let mut r = vec![cr.format as u8];
            r.extend_from_slice(&(cr.column_formats.len() as i16).to_be_bytes());
            for f in &cr.column_formats {
                r.extend_from_slice(&f.to_be_bytes());
            }
            assert_eq!(r, body, "CopyResponse rebuild");
        }
        r if !matches!(tag, b'G' | b'H' | b'W') => refused("CopyResponse", r),
        Err(e) => assert_wire_error(&e),
    }
}

fn put_value(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            out.extend_from_slice(&(v.len() as i32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

fn target_body(t: Target<'_>) -> Vec<u8> {
    let (kind, name) = match t {
        Target::Statement(n) => (b'S', n),
        Target::Portal(n) => (b'P', n),
    };
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b
}

/// A parse failure on the right tag is a body error, never a framing or tag error; its
/// message renders (the proxy sends it to the client).
fn assert_wire_error(e: &WireError) {
    assert!(
        matches!(e, WireError::Truncated { .. } | WireError::Invalid { .. }),
        "unexpected error kind for a body: {e:?}"
    );
    assert!(!e.to_string().is_empty());
}
