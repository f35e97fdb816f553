"""Fuzz target ``auth``: the token of an upgrade (mailpush.auth.Verifier).

The token comes from outside with every upgrade (query, cookie or
Authorization header). Two kinds of input, by the control byte:

- even: the rest is the token text as it arrives (decoded as latin-1, as
  the handshake decodes header values), so the header, the base64url and
  the signature checks are fuzzed;
- odd: the rest is ``header JSON`` + NUL + ``claims JSON``: the target
  signs them with the verifier's secret, so the checks behind the
  signature (the claims: ``exp``, ``nbf``, ``iat``, ``aud``, ``jti``,
  ``sub``) are reached too.

Checks: ``verify`` returns the ``sub`` claim, a non-empty string, or raises
only :class:`AuthError` (401) with a reason; a token that verifies also
has ``alg`` HS256 in a header that is a JSON object.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own

with atheris.instrument_imports(include=["mailpush.auth", "mailpush.handshake"]):
    from mailpush.auth import Verifier
    from mailpush.errors import AuthError

NAME = "auth"
MAX_LEN = 2048
SECRET = b"fuzz-secret-0123456789abcdef-0123456789"
NOW = 1_800_000_000.0
VERIFIER = Verifier(SECRET, clock=lambda: NOW)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def signed(header: bytes, claims: bytes) -> str:
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    mac = hmac.digest(SECRET, signing_input.encode("ascii"), hashlib.sha256)
    return f"{signing_input}.{b64url(mac)}"


def check(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        header, _, claims = data[1:].partition(b"\0")
        token = signed(header, claims)
    else:
        token = data[1:].decode("latin-1")
    sub, err = own(AuthError, VERIFIER.verify, token)
    if err is not None:
        expect(err.status == 401 and isinstance(err.reason, str) and err.reason, f"refused with {err.status}")
        return
    expect(type(sub) is str and sub, f"accepted with sub {sub!r}")
    try:
        head = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    except ValueError:
        return  # JSON Python's reader refuses and msgspec's takes: no claim
    expect(type(head) is dict and head.get("alg") == "HS256", f"accepted a token with header {head!r}")


HS256 = b'{"alg":"HS256","typ":"JWT"}'


def _claims(**claims) -> bytes:
    return json.dumps(claims, separators=(",", ":")).encode()


# Seeds: tokens like those mint() makes and tests/test_auth.py refuses.
SEEDS = {
    "valid-signed": b"\x01" + HS256 + b"\0" + _claims(sub="alice@example.com", iat=int(NOW), exp=int(NOW) + 3600),
    "expired-signed": b"\x01" + HS256 + b"\0" + _claims(sub="a", exp=int(NOW) - 1),
    "nbf-future": b"\x01" + HS256 + b"\0" + _claims(sub="a", exp=int(NOW) + 9, nbf=int(NOW) + 5),
    "aud": b"\x01" + HS256 + b"\0" + _claims(sub="a", exp=int(NOW) + 9, aud="x", jti=5),
    "float-exp": b"\x01" + HS256 + b"\0" + b'{"sub":"a","exp":1e400}',
    "alg-none": b'\x01{"alg":"none"}\0' + _claims(sub="a", exp=int(NOW) + 9),
    "crit": b'\x01{"alg":"HS256","crit":["b64"],"b64":false}\0' + _claims(sub="a", exp=int(NOW) + 9),
    "raw-valid": b"\x00" + signed(HS256, _claims(sub="alice@example.com", exp=int(NOW) + 3600)).encode("ascii"),
    "raw-padded": b"\x00" + signed(HS256, _claims(sub="a", exp=int(NOW) + 1)).encode("ascii") + b"==",
    "raw-two-parts": b"\x00eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0",
    "raw-junk": b"\x00\xff.\xfe.+/",
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
