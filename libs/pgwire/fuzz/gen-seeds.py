#!/usr/bin/env python3
"""Writes the seed corpus of the pgwire fuzz targets: real PostgreSQL v3 messages, as psql
and a server exchange them, byte for byte per the protocol's message formats. The files are
committed under seeds/; run this again only to change them:

    python3 libs/pgwire/fuzz/gen-seeds.py

seeds/frames/*: streams of tagged messages. The target takes its chunk size and a tiny
limit from the first two bytes, so the same stream is also split in different ways.
seeds/startup/*: first packets of a connection (length word, then body)."""

import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def i16(v):
    return struct.pack(">h", v)


def i32(v):
    return struct.pack(">i", v)


def cstr(s):
    return s.encode() + b"\0"


def msg(tag, body=b""):
    return tag.encode() + i32(len(body) + 4) + body


def value(v):
    return i32(-1) if v is None else i32(len(v)) + v


# Frontend.
def query(sql):
    return msg("Q", cstr(sql))


def parse(name, sql, types=()):
    return msg("P", cstr(name) + cstr(sql) + i16(len(types)) + b"".join(i32(t) for t in types))


def bind(portal, stmt, pformats, params, rformats):
    return msg(
        "B",
        cstr(portal)
        + cstr(stmt)
        + i16(len(pformats))
        + b"".join(i16(f) for f in pformats)
        + i16(len(params))
        + b"".join(value(p) for p in params)
        + i16(len(rformats))
        + b"".join(i16(f) for f in rformats),
    )


def describe(kind, name):
    return msg("D", kind.encode() + cstr(name))


def execute(portal, max_rows):
    return msg("E", cstr(portal) + i32(max_rows))


def close(kind, name):
    return msg("C", kind.encode() + cstr(name))


SYNC = msg("S")
FLUSH = msg("H")
TERMINATE = msg("X")


# Backend.
def auth(code, extra=b""):
    return msg("R", i32(code) + extra)


def parameter_status(name, val):
    return msg("S", cstr(name) + cstr(val))


def backend_key(pid, key):
    return msg("K", i32(pid) + i32(key))


def ready(status):
    return msg("Z", status.encode())


def row_description(fields):
    body = i16(len(fields))
    for name, table, col, typ, size, mod, fmt in fields:
        body += cstr(name) + i32(table) + i16(col) + i32(typ) + i16(size) + i32(mod) + i16(fmt)
    return msg("T", body)


def data_row(cells):
    return msg("D", i16(len(cells)) + b"".join(value(c) for c in cells))


def command_complete(tag):
    return msg("C", cstr(tag))


def error(tag, fields):
    return msg(tag, b"".join(k.encode() + cstr(v) for k, v in fields) + b"\0")


def copy_response(tag, fmt, cols):
    return msg(tag, bytes([fmt]) + i16(len(cols)) + b"".join(i16(c) for c in cols))


FRAMES = {
    "simple-query": query("select id, email from users where id = 1"),
    "extended-query": parse("s1", "select $1::int + $2", [23, 0])
    + bind("p1", "s1", [1], [i32(7), None], [0])
    + describe("P", "p1")
    + execute("p1", 0)
    + close("S", "s1")
    + SYNC,
    "bind-each-format": bind("", "", [0, 1], [b"42", b"\x00\x00\x00\x2a"], [1, 0]),
    "password": msg("p", cstr("agt_token_abcdef")) + TERMINATE,
    "server-startup": auth(3)
    + auth(0)
    + parameter_status("server_version", "17.2")
    + parameter_status("client_encoding", "UTF8")
    + backend_key(4242, -123456789)
    + ready("I"),
    "server-result": row_description(
        [
            ("id", 16384, 1, 23, 4, -1, 0),
            ("email", 16384, 2, 25, -1, -1, 0),
            ("?column?", 0, 0, 23, 4, -1, 1),
        ]
    )
    + data_row([b"1", b"alice@example.com", None])
    + data_row([b"2", b"", b"\x00\x00\x00\x02"])
    + command_complete("SELECT 2")
    + ready("T"),
    "server-error": error(
        "E",
        [
            ("S", "ERROR"),
            ("V", "ERROR"),
            ("C", "42501"),
            ("M", "permission denied for table users"),
            ("D", "detail"),
            ("H", "ask for a grant"),
            ("F", "aclchk.c"),
            ("L", "2843"),
        ],
    )
    + error("N", [("S", "NOTICE"), ("C", "00000"), ("M", "hello")])
    + ready("E"),
    "server-copy": copy_response("H", 0, [0, 0])
    + msg("d", b"1\talice\n")
    + msg("c")
    + copy_response("G", 1, [1])
    + copy_response("W", 0, [])
    + command_complete("COPY 1"),
    "commands": command_complete("INSERT 0 12")
    + command_complete("BEGIN")
    + msg("1")
    + msg("2")
    + msg("n")
    + msg("I"),
    "partial": query("select 1")[:7],
    "too-long": b"Q" + i32(0x7FFFFFFF) + b"select",
    "bad-length": b"Q" + i32(3),
}


def startup(version, params):
    body = i32(version) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return i32(len(body) + 4) + body


STARTUP = {
    "psql": startup(
        196608,
        [
            ("user", "agent"),
            ("database", "prod"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
        ],
    ),
    "protocol-3-2": startup(196610, [("user", "agent"), ("_pq_.x", "1")]),
    "ssl-request": i32(8) + i32(80877103),
    "gssenc-request": i32(8) + i32(80877104),
    "cancel-request": i32(16) + i32(80877102) + i32(4242) + i32(-123456789),
    "v2-refused": startup(131072, [("user", "agent")]),
    "ssl-then-query": i32(8) + i32(80877103) + query("select 1"),
    "too-long": i32(1_000_000) + b"\0" * 8,
}
# The target also parses the whole input as a body (what follows the length word).
STARTUP.update({"body-" + k: STARTUP[k][4:] for k in ["psql", "ssl-request", "cancel-request"]})


def write(kind, seeds):
    out = os.path.join(HERE, "seeds", kind)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


write("frames", FRAMES)
write("startup", STARTUP)
