#!/usr/bin/env python3
"""Builds labeled.tsv, the labeled test set of the masking detectors.

Each line: <detector> TAB <sample>. In a sample, ⟦...⟧ marks a span that the named
detector must mask (a positive); a line without ⟦ ⟧ is a look-alike negative for that
detector. Escapes: \\n newline, \\t tab, \\\\ backslash.

Synthetic secrets (cards, IBANs, tokens, JWTs, keys) are generated here with a fixed seed,
with real checksums where the format has one; the surrounding text is hand-written to look
like what passes through the proxies (logs, JSON, env dumps, SQL results, shell output).
Nothing here is a real credential. Run: python3 gen_labeled.py > labeled.tsv
"""

import base64
import json
import random
import string

rnd = random.Random(20240501)
lines = []


def add(kind, sample):
    # positives are written with [[ ]] for readability and stored with the unambiguous ⟦ ⟧
    if "⟦" not in sample:
        sample = sample.replace("[[", "⟦").replace("]]", "⟧")
    lines.append((kind, sample))


def rand_str(alphabet, n):
    return "".join(rnd.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPPER_B32 = string.ascii_uppercase + "234567"
B64URL = ALNUM + "-_"
B64 = ALNUM + "+/"

# ---------------------------------------------------------------- email
for s in [
    "contact [[alice@example.com]] for access",
    "From: Bob Smith <[[bob.smith@mail.example.org]]>",
    "notify [[user_name+alerts@sub.domain.co.uk]] on failure",
    "mailto:[[info@company.io]]",
    "email=[[first.last@corp-mail.net]];role=admin",
    '{"id": 17, "email": "[[x.y@z-corp.com]]", "active": true}',
    "[[JOHN.DOE@EXAMPLE.COM]] | John Doe | 2021-03-04",
    "reply to [[a@b.co]] please",
    "owner: [[ops-team@k8s.cluster.example]]",
    "Signed-off-by: Jane Roe ([[jane.roe@kernel.org]])",
    "write to [[sales@acme.com]].",
    " 42 | [[user123@host456.com]] | active",
    "cc: [[m.o'brien@example.ie]]",
    "[[support@xn--bcher-kva.example]] handles umlaut domains",
    "Author: dev <[[dev@users.noreply.github.com]]>",
    "login failed for [[Test.User_01@Example-Mail.travel]] from web",
]:
    add("email", s)
for s in [
    "@Override public void run()",
    "ssh deploy@localhost",
    "return foo@bar;",
    "background: url(icon@2x.png)",
    "npm install @babel/core@7.22.5",
    "meeting @ 5pm in room 4",
    "price 3@$5 each",
    "@channel please review the deploy",
    "twitter: @alice_smith",
    "scp build.tar user@host:/tmp/",
    "docker pull nginx@sha256:0d17b565c37bcbd895e9d92315a05c1c3c9a29f762b011a10c54a66cd53c9b31",
    "@@@@@@@@@@",
    "git@github.com:agentgate/agentgate.git",
    "decorator @app.route('/health')",
]:
    add("email", s)

# ---------------------------------------------------------------- phone
for s in [
    "call [[+1 415 555 2671]] after 5",
    "Phone: [[(415) 555-2671]]",
    "mobile [[415-555-2671]]",
    "fax [[415.555.2671]]",
    "London office [[+44 20 7946 0958]]",
    "Berlin [[+49 30 901820]]",
    "Paris [[+33 1 23 45 67 89]]",
    '{"phone": "[[+14155552671]]"}',
    "toll free [[1-800-555-0199]]",
    "India [[+91 98765 43210]]",
    "tel: [[+61 2 9374 4000]]",
    "US [[+1 (415) 555-2671]]",
    "call [[212-555-0147]] now",
    "Tokyo [[+81 3-1234-5678]]",
    "Sao Paulo [[+55 11 91234-5678]]",
    "NYC [[1 (646) 555-0123]]",
    "contact | [[+353 1 234 5678]] | Dublin",
    "London (national format) [[020 7946 0958]]",
    "Paris (national format) [[06 12 34 56 78]]",
]:
    add("phone", s)
for s in [
    "released 2024-01-15",
    "2023-10-05 14:23:11 INFO started",
    "order #415-555",
    "ISBN 978-3-16-148410-0",
    "tracking 1Z999AA10123456784",
    "ext 555-1234",
    "PID 12345 exited",
    "+5 points",
    "open 12:30-13:45",
    "id=4155552671",
    "pi is 3.14159265",
    "(2024) annual report",
    "1-2-3-4-5",
    "total 1,234,567.89",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "timestamp 1700000000123",
    "offset +0200",
    "build 20240115.3",
    "range 100-200-300",
]:
    add("phone", s)

# ---------------------------------------------------------------- US SSN
for s in [
    "SSN: [[123-45-6789]]",
    "ssn [[219-09-9999]]",
    "[[078-05-1120]] was printed on wallets",
    "tax id [[123 45 6789]]",
    "SSN#: [[456-78-9012]]",
    '{"ssn":"[[321-54-9876]]"}',
    "employee 17, [[587-12-3456]].",
    " 3 | Ann | [[001-01-0001]] |",
    "social=[[772-33-4410]]&dob=1980",
]:
    add("us_ssn", s)
for s in [
    "000-12-3456",
    "666-12-3456",
    "900-12-3456",
    "123-00-4567",
    "123-45-0000",
    "2023-45-6789",
    "123-456-7890",
    "12-345-6789",
    "123-45-67890",
    "1234-56-7890",
    "part 123-45-6789-01",
    "v123-45-6789",
    "3.123-45-6789",
]:
    add("us_ssn", s)

# ---------------------------------------------------------------- payment cards


def luhn_complete(prefix, length):
    digits = prefix + [rnd.randrange(10) for _ in range(length - len(prefix) - 1)]
    for check in range(10):
        d = digits + [check]
        total = 0
        for i, x in enumerate(reversed(d)):
            if i % 2 == 1:
                x *= 2
                if x > 9:
                    x -= 9
            total += x
        if total % 10 == 0:
            return d
    raise AssertionError


def luhn_ok(d):
    total = 0
    for i, x in enumerate(reversed(d)):
        if i % 2 == 1:
            x *= 2
            if x > 9:
                x -= 9
        total += x
    return total % 10 == 0


BRANDS = [
    ([4], 16), ([4], 13), ([4], 19), ([5, 1], 16), ([5, 5], 16), ([2, 2, 2, 1], 16),
    ([2, 7, 2, 0], 16), ([3, 4], 15), ([3, 7], 15), ([6, 0, 1, 1], 16), ([6, 5], 16),
    ([6, 4, 4], 16), ([3, 5, 2, 8], 16), ([3, 5, 8, 9], 16), ([3, 0, 0], 14), ([3, 6], 14),
    ([6, 2], 16), ([6, 2], 19), ([5, 0, 1, 8], 12), ([6, 7, 5, 9], 16), ([6, 3, 0, 4], 19),
]


def fmt_card(d, style):
    s = "".join(map(str, d))
    if style == "plain":
        return s
    sep = " " if style == "space" else "-"
    if len(s) == 15:
        return sep.join([s[:4], s[4:10], s[10:]])
    return sep.join(s[i : i + 4] for i in range(0, len(s), 4))


CARD_CTX = [
    "card [[{}]] exp 12/29",
    "pan={}&cvv=123".replace("{}", "[[{}]]"),
    '{{"card_number": "[[{}]]", "exp": "04/27"}}',
    " 17 | Ann Lee | [[{}]] | visa",
    "charged [[{}]] for $42.00",
    "CARD:[[{}]]",
]
known = [
    "4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
    "3530111333300000", "30569309025904", "4012888888881881", "5105105105105100",
    "371449635398431", "6011000990139424", "3566002020360505", "38520000023237",
    "6200000000000005", "2223003122003222", "4000056655665556", "5200828282828210",
    "4242424242424242", "6205500000000000004",
]
for k in known:
    d = [int(c) for c in k]
    assert luhn_ok(d), k
    add("payment_card", rnd.choice(CARD_CTX).format(fmt_card(d, rnd.choice(["plain", "space", "dash"]))))
for i in range(60):
    prefix, length = BRANDS[i % len(BRANDS)]
    d = luhn_complete(prefix, length)
    style = ["plain", "space", "dash"][i % 3]
    add("payment_card", CARD_CTX[i % len(CARD_CTX)].format(fmt_card(d, style)))
# negatives: the same shapes with a wrong check digit, and other long numbers
for i in range(60):
    prefix, length = BRANDS[i % len(BRANDS)]
    d = luhn_complete(prefix, length)
    d[-1] = (d[-1] + 1 + rnd.randrange(9)) % 10
    assert not luhn_ok(d)
    style = ["plain", "space", "dash"][i % 3]
    add("payment_card", CARD_CTX[i % len(CARD_CTX)].format(fmt_card(d, style)).replace("[[", "").replace("]]", ""))
for s in [
    "order 1234567812345670 shipped",  # Luhn-valid, no issuer starts with 1
    "epoch ms 1700000000000",
    "trace 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "isbn 9783161484100",
    "imei 490154203237518",  # Luhn-valid IMEI, no card issuer starts with 49 at length 15
    "account 0001234567890123",
    "digits 41111111111111111111111",
]:
    add("payment_card", s)

# ---------------------------------------------------------------- IBAN
IBAN_LEN = {
    "NO": 15, "BE": 16, "DK": 18, "FI": 18, "NL": 18, "SI": 19, "AT": 20, "EE": 20, "LT": 20,
    "LU": 20, "CH": 21, "HR": 21, "LV": 21, "BG": 22, "DE": 22, "GB": 22, "IE": 22, "RS": 22,
    "AE": 23, "IL": 23, "CZ": 24, "ES": 24, "RO": 24, "SA": 24, "SE": 24, "SK": 24, "PT": 25,
    "TR": 26, "FR": 27, "GR": 27, "IT": 27, "MC": 27, "PL": 28, "HU": 28, "CY": 28, "BR": 29,
    "QA": 29, "KW": 30, "MT": 31,
}


def iban_remainder(s):
    r = s[4:] + s[:4]
    n = "".join(str(int(c, 36)) for c in r)
    return int(n) % 97


def make_iban(cc, bban):
    base = cc + "00" + bban
    check = 98 - iban_remainder(base)
    return "%s%02d%s" % (cc, check, bban)


def group4(s):
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


known_ibans = [
    "GB82WEST12345698765432", "DE89370400440532013000", "FR1420041010050500013M02606",
    "NL91ABNA0417164300", "ES9121000418450200051332", "IT60X0542811101000000123456",
    "CH9300762011623852957", "BE68539007547034", "AT611904300234573201",
    "PL61109010140000071219812874", "SE4550000000058398257466", "NO9386011117947",
    "DK5000400440116243", "FI2112345600000785", "IE29AIBK93115212345678",
    "LU280019400644750000", "CZ6508000000192000145399", "HU42117730161111101800000000",
    "GR1601101250000000012300695", "SA0380000000608010167519", "AE070331234567890123456",
]
IBAN_CTX = [
    "IBAN: [[{}]]",
    "pay to [[{}]] by Friday",
    '{{"iban": "[[{}]]"}}',
    " 3 | ACME GmbH | [[{}]] |",
    "Kontonummer [[{}]], BIC COBADEFFXXX",
]
for i, k in enumerate(known_ibans):
    assert iban_remainder(k) == 1, k
    add("iban", IBAN_CTX[i % len(IBAN_CTX)].format(k if i % 2 else group4(k)))
ccs = sorted(IBAN_LEN)
for i in range(40):
    cc = ccs[i % len(ccs)]
    bban = rand_str(string.digits, IBAN_LEN[cc] - 4)
    iban = make_iban(cc, bban)
    assert iban_remainder(iban) == 1
    add("iban", IBAN_CTX[i % len(IBAN_CTX)].format(iban if i % 2 else group4(iban)))
# negatives: one digit changed (mod 97 catches every single-digit error), unknown country,
# wrong length, lower case
for i in range(40):
    cc = ccs[i % len(ccs)]
    iban = make_iban(cc, rand_str(string.digits, IBAN_LEN[cc] - 4))
    pos = rnd.randrange(4, len(iban))
    bad = iban[:pos] + str((int(iban[pos]) + 1 + rnd.randrange(9)) % 10) + iban[pos + 1 :]
    assert iban_remainder(bad) != 1
    add("iban", IBAN_CTX[i % len(IBAN_CTX)].format(bad if i % 2 else group4(bad)).replace("[[", "").replace("]]", ""))
for s in [
    "ref XX8912345678901234567890",
    "code DE8937040044053201300",
    "code DE893704004405320130001",
    "de89370400440532013000",
    "order AB12 3456 7890",
    "ISO US12345678901234",
]:
    add("iban", s)

# ---------------------------------------------------------------- IP addresses
for s in [
    "connect to [[10.0.0.1]]",
    "gateway [[192.168.1.254]]",
    "host [[172.16.254.3]] is up",
    "dns [[8.8.8.8]]:53",
    "subnet [[10.1.2.3]]/24",
    "inet [[127.0.0.1]] netmask [[255.0.0.0]]",
    "from=[[203.0.113.195]],to=[[198.51.100.7]]",
    "[⟦192.0.2.44⟧] accepted",
    "X-Forwarded-For: [[198.51.100.23]], [[10.0.3.4]]",
]:
    add("ipv4", s)
for s in [
    "version 1.2.3",
    "1.2.3.4.5",
    "256.1.1.1",
    "01.02.03.04",
    "build 10.0.19041.1",
    "v1.2.3.4",
    "3.14.159.26535",
    "192.168.1",
    "package 2.4.1.0 released",
]:
    add("ipv4", s)
for s in [
    "addr [[2001:db8::1]]",
    "link [[fe80::1ff:fe23:4567:890a]]",
    "full [[2001:0db8:85a3:0000:0000:8a2e:0370:7334]]",
    "https://[⟦2001:db8::8a2e:370:7334⟧]:443/",
    "mapped [[::ffff:192.0.2.128]]",
    "resolver [[2606:4700:4700::1111]]",
    "inet6 [[fe80::a00:27ff:fe4e:66a1]]/64 scope link",
    "ula [[fd00:1234:5678::42]]",
]:
    add("ipv6", s)
for s in [
    "at 12:34:56",
    "std::vector<int> v;",
    "a::b::c",
    "listen [::]:80",
    "mac de:ad:be:ef:00:11",
    "10:20:30:40:50:60:70:80:90",
    "http://localhost:8080",
    "Foo::Bar::new()",
    "dead::beef",
]:
    add("ipv6", s)

# ---------------------------------------------------------------- JWT


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(alg="HS256", claims=None, sig_len=32):
    header = b64u(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    claims = claims or {"sub": rand_str(string.digits, 8), "iat": 1700000000 + rnd.randrange(10**6)}
    payload = b64u(json.dumps(claims, separators=(",", ":")).encode())
    sig = b64u(bytes(rnd.randrange(256) for _ in range(sig_len)))
    return "%s.%s.%s" % (header, payload, sig)


JWT_CTX = [
    "Authorization: Bearer [[{}]]",
    "token=[[{}]]&next=/home",
    '{{"access_token": "[[{}]]", "expires_in": 3600}}',
    "export TOKEN=[[{}]]",
    "cookie: session=[[{}]]; Path=/",
]
for i in range(12):
    alg = ["HS256", "RS256", "ES256", "EdDSA"][i % 4]
    sig = {"HS256": 32, "RS256": 256, "ES256": 64, "EdDSA": 64}[alg]
    claims = None
    if i % 3 == 0:
        claims = {"sub": "agent-%d" % i, "email": "agent%d@example.com" % i, "roles": ["read"], "exp": 1800000000}
    add("jwt", JWT_CTX[i % len(JWT_CTX)].format(make_jwt(alg, claims, sig)))
nojwt_header = b64u(b'{"foo":"bar"}')
for s in [
    "header eyJhbGciOiJIUzI1NiJ9 only",
    "eyJ.eyJ.x",
    "%s.%s.%s" % (nojwt_header, b64u(b'{"a":1}'), b64u(b"sig")),
    "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
    "see eyJhbGciOiJIUzI1NiJ9 in the docs",
    "data:image/png;base64,eyJ0eXBlIjoiaW1hZ2UifQ==",
]:
    add("jwt", s)

# ---------------------------------------------------------------- private keys


def pem(label, nbytes):
    body = base64.b64encode(bytes(rnd.randrange(256) for _ in range(nbytes))).decode()
    lines_ = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----" % (label, "\n".join(lines_), label)


for label, n in [
    ("RSA PRIVATE KEY", 1190), ("PRIVATE KEY", 1210), ("EC PRIVATE KEY", 121),
    ("OPENSSH PRIVATE KEY", 400), ("ENCRYPTED PRIVATE KEY", 1300), ("DSA PRIVATE KEY", 440),
]:
    add("private_key", "$ cat key.pem\n[[%s]]\n$ " % pem(label, n))
k = pem("PRIVATE KEY", 1210).replace("\n", "\\n")
add("private_key", '{"type": "service_account", "private_key": "[[%s]]\\n", "client_email": "x"}' % k)
add("private_key", "$ head -3 id_rsa\n[[-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9OiZ1BjP5CE/Wm/Rr500P\nRK+Lh9x5eJPo5CAZ3/ANBE0sTK0ZsDGMak2m1g7]]\n$ ")
pgp = pem("PGP PRIVATE KEY BLOCK", 900).replace("-----\n", "-----\nVersion: GnuPG v2\n\n", 1)
add("private_key", "[[%s]]" % pgp)
add("private_key", "[[-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n%s\n-----END RSA PRIVATE KEY-----]]" % base64.b64encode(bytes(rnd.randrange(256) for _ in range(600))).decode())
for s in [
    pem("CERTIFICATE", 800),
    pem("PUBLIC KEY", 294),
    pem("RSA PUBLIC KEY", 270),
    "BEGIN PRIVATE KEY (without the dashes)",
    pem("CERTIFICATE REQUEST", 600),
]:
    add("private_key", s)

# ---------------------------------------------------------------- cloud keys and tokens
TOKEN_CTX = [
    "export {name}=[[{tok}]]",
    '{{"{name}": "[[{tok}]]"}}',
    "{name}: [[{tok}]]",
    "curl -H 'Authorization: token [[{tok}]]' https://api.example.com",
    "found [[{tok}]] in .env",
]


def tokens(kind, name, gen, n=8):
    for i in range(n):
        add(kind, TOKEN_CTX[i % len(TOKEN_CTX)].format(name=name, tok=gen(i)))


tokens("aws_access_key", "AWS_ACCESS_KEY_ID", lambda i: ["AKIA", "ASIA", "ABIA", "ACCA"][i % 4] + rand_str(UPPER_B32, 16))
add("aws_access_key", "aws_access_key_id = [[AKIAIOSFODNN7EXAMPLE]]")
for s in [
    "AKIA" + rand_str(UPPER_B32, 15),
    "AKIA" + rand_str(UPPER_B32, 17),
    "akia" + rand_str(UPPER_B32, 16).lower(),
    "XAKIA" + rand_str(UPPER_B32, 16),
    "AKIA_TOOL_VERSION=3",
    "UserId: AIDA" + rand_str(UPPER_B32, 16),  # IAM user ID: an identifier, not a secret
    "RoleId: AROA" + rand_str(UPPER_B32, 16),  # IAM role ID
]:
    add("aws_access_key", s)
for fmt in [
    "aws_secret_access_key = [[{}]]",
    "AWS_SECRET_ACCESS_KEY=[[{}]]",
    '"SecretAccessKey": "[[{}]]",',
    "export AWS_SECRET_ACCESS_KEY='[[{}]]'",
    "<SecretAccessKey>[[{}]]</SecretAccessKey>",
    "secretAccessKey: [[{}]]",
]:
    add("aws_secret_key", fmt.format(rand_str(B64, 40)))
add("aws_secret_key", "aws_secret_access_key = [[wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY]]")
for s in [
    "aws_secret_access_key = " + rand_str(B64, 39),
    "aws_secret_access_key is not set",
    "AWS_SECRET_ACCESS_KEY=${AWS_SECRET}",
]:
    add("aws_secret_key", s)

tokens("github_token", "GITHUB_TOKEN", lambda i: ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"][i % 5] + rand_str(ALNUM, 36))
tokens("github_token", "GH_PAT", lambda i: "github_pat_" + rand_str(ALNUM, 22) + "_" + rand_str(ALNUM, 59), 4)
for s in ["ghp_short", "ghx_" + rand_str(ALNUM, 36), "xghp_" + rand_str(ALNUM, 36), "the ghp_ prefix marks personal tokens"]:
    add("github_token", s)
tokens("gitlab_token", "GITLAB_TOKEN", lambda i: "glpat-" + rand_str(B64URL, 20), 6)
for s in ["glpat-short", "glpat-"]:
    add("gitlab_token", s)
tokens("slack_token", "SLACK_TOKEN", lambda i: ["xoxb-", "xoxp-", "xoxa-", "xapp-"][i % 4] + "%d-%d-%s" % (rnd.randrange(10**11, 10**12), rnd.randrange(10**12, 10**13), rand_str(ALNUM, 24)), 8)
add("slack_token", "webhook https://[[hooks.slack.com/services/T%s/B%s/%s]]" % (rand_str(string.ascii_uppercase + string.digits, 8), rand_str(string.ascii_uppercase + string.digits, 10), rand_str(ALNUM, 24)))
for s in ["xoxb-", "xoxb-123", "xoxz-" + rand_str(ALNUM, 30), "https://hooks.slack.com/services/"]:
    add("slack_token", s)
tokens("google_api_key", "GOOGLE_API_KEY", lambda i: "AIza" + rand_str(B64URL, 35), 6)
for s in ["AIza" + rand_str(B64URL, 30), "AIzaSy" + rand_str(ALNUM, 40)]:
    add("google_api_key", s)
tokens("stripe_key", "STRIPE_KEY", lambda i: ["sk_live_", "rk_live_", "sk_test_", "whsec_"][i % 4] + rand_str(ALNUM, 24 + rnd.randrange(76)), 8)
for s in ["pk_live_" + rand_str(ALNUM, 24), "sk_live_short", "pk_test_" + rand_str(ALNUM, 24)]:
    add("stripe_key", s)
tokens("openai_api_key", "OPENAI_API_KEY", lambda i: ["sk-proj-", "sk-svcacct-", "sk-"][i % 3] + (rand_str(B64URL, 120) if i % 3 < 2 else rand_str(ALNUM, 48)), 6)
for s in ["sk-proj-short", "task-" + rand_str(ALNUM, 48), "sk-" + rand_str(ALNUM, 40)]:
    add("openai_api_key", s)
tokens("anthropic_api_key", "ANTHROPIC_API_KEY", lambda i: "sk-ant-api03-" + rand_str(B64URL, 93) + "AA", 5)
for s in ["sk-ant-", "sk-ant-short"]:
    add("anthropic_api_key", s)
tokens("npm_token", "NPM_TOKEN", lambda i: "npm_" + rand_str(ALNUM, 36), 5)
for s in ["npm_" + rand_str(ALNUM, 20), "npm_config_cache=/tmp/npm"]:
    add("npm_token", s)
tokens("pypi_token", "PYPI_TOKEN", lambda i: "pypi-AgEIcHlwaS5vcmc" + rand_str(B64URL, 150), 4)
for s in ["pypi-AgEIcHlwaS5vcmc", "pypi-upload"]:
    add("pypi_token", s)
tokens("huggingface_token", "HF_TOKEN", lambda i: "hf_" + rand_str(string.ascii_letters, 34), 5)
for s in ["from huggingface_hub import hf_hub_download", "hf_" + rand_str(ALNUM, 10)]:
    add("huggingface_token", s)
tokens("sendgrid_key", "SENDGRID_API_KEY", lambda i: "SG." + rand_str(B64URL, 22) + "." + rand_str(B64URL, 43), 5)
for s in ["SG.short.x", "SG." + rand_str(ALNUM, 66)]:
    add("sendgrid_key", s)
for i in range(4):
    key = base64.b64encode(bytes(rnd.randrange(256) for _ in range(64))).decode()
    add("azure_storage_key", "DefaultEndpointsProtocol=https;AccountName=acct%d;AccountKey=[[%s]];EndpointSuffix=core.windows.net" % (i, key))
for s in ["AccountKey=short;", "AccountKey="]:
    add("azure_storage_key", s)

# ---------------------------------------------------------------- URL credentials
for s in [
    "DATABASE_URL=postgres://app:[[s3cret]]@db:5432/app",
    "https://user:[[pa%40ss]]@example.com/x",
    "mysql://root:[[hunter2]]@mysql.internal/db",
    "redis://:[[secretpass]]@cache:6379/0",
    "amqp://guest:[[guest]]@rabbit:5672//",
    '{"dsn": "mongodb+srv://admin:[[Xy7#kL9q]]@cluster0.example.net/test"}',
    "proxy=http://bob:[[p@ssw0rd]]@proxy.internal:3128",
]:
    add("url_credentials", s)
for s in [
    "https://example.com/a:b@c",
    "https://user@host/path",
    "http://host:8080/",
    "ssh://git@github.com:22/org/repo",
    "see http://example.com:80@",
]:
    add("url_credentials", s)


def esc(s):
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


print("# labeled test set of the masking detectors; generated by gen_labeled.py (see its doc)")
for kind, sample in lines:
    print("%s\t%s" % (kind, esc(sample)))
