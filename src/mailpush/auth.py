"""Tokens: JWT, HS256, claim ``sub`` = subscriber id, ``exp`` required.

Minting goes through PyJWT (:func:`mint`). Verification sits on the upgrade
path of every connection, where PyJWT's ``decode`` costs ~60 µs on these
machines (most of it a per-character base64 check and option merging), a
quarter of the whole per-connection budget at 3,500 upgrades/s. So
:class:`Verifier` checks the one shape we accept itself — compact JWS,
``alg`` exactly ``HS256``, HMAC-SHA256 compared in constant time, ``exp``
and ``nbf`` against the clock — in a few microseconds. ``tests/test_auth.py``
checks it against PyJWT, token by token, accept for accept and reject for
reject.

The token never appears in an error message or a log line.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import time
from collections.abc import Callable

import jwt
import msgspec

from .errors import AuthError, ConfigError
from .handshake import Request, cookie_value, query_param

__all__ = [
    "MIN_SECRET_BYTES",
    "MAX_TOKEN_BYTES",
    "PROTOCOL",
    "TOKEN_PROTOCOL_PREFIX",
    "Verifier",
    "mint",
    "token_from_request",
    "load_secret",
]

# RFC 7518 §3.2: an HS256 key must be at least as long as the hash (32 bytes).
MIN_SECRET_BYTES = 32
# Real tokens here are ~150 bytes; anything much longer is not ours and is
# refused before any base64 or HMAC work.
MAX_TOKEN_BYTES = 4096
# A NumericDate beyond this is not a date (the largest finite double).
_MAX_NUMERIC_DATE = int(1.7976931348623157e308)
# Seconds of clock skew tolerated on exp/nbf between the minter and us.
LEEWAY_SECONDS = 0

COOKIE_NAME = "mailpush_token"
QUERY_PARAM = "token"
# The subprotocol of mailpush's packets, and the one that carries a token
# in ``Sec-WebSocket-Protocol`` (a browser cannot set headers, and a token
# there stays out of URLs and the logs that keep them):
# ``new WebSocket(url, ["mailpush.v1", "mailpush.token." + jwt])``. The
# answer names ``mailpush.v1``, never the token.
PROTOCOL = "mailpush.v1"
TOKEN_PROTOCOL_PREFIX = "mailpush.token."


# base64url → standard alphabet for binascii; '+' and '/' are not base64url
# and become '!', which the strict decoder refuses.
_TO_STD = bytes.maketrans(b"-_+/", b"+/!!")
_TO_URL = bytes.maketrans(b"+/", b"-_")
_json = msgspec.json.decode
# HMAC (RFC 2104): the key padded to SHA-256's block, XORed with these.
_SHA256_BLOCK = 64
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
# Header segments already checked (every token of one issuer has the same
# one): at most this many are remembered, the first ones seen.
_HEADER_CACHE = 16


def _b64url(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2): the alphabet only, canonical, and at
    most the padding the last quantum needs (some issuers add it); junk is
    an error, never skipped."""
    stripped = segment.rstrip("=")
    pad = len(segment) - len(stripped)
    if pad > 2 or (pad and len(segment) % 4) or len(stripped) % 4 == 1:
        raise ValueError("bad base64url padding")
    std = stripped.encode("ascii").translate(_TO_STD)
    raw = binascii.a2b_base64(std + b"=" * (-len(std) % 4), strict_mode=True)
    if binascii.b2a_base64(raw, newline=False).rstrip(b"=") != std:
        raise ValueError("not canonical base64")
    return raw


def _number(claims: dict, name: str) -> int | None:
    if name not in claims:
        return None
    value = claims[name]
    if type(value) not in (int, float):
        raise AuthError(f"token '{name}' claim is not a number")
    try:
        number = int(value)
    except (ValueError, OverflowError):
        raise AuthError(f"token '{name}' claim is not a finite number") from None
    if not -_MAX_NUMERIC_DATE <= number <= _MAX_NUMERIC_DATE:
        # A JSON number beyond a double's range (the decoder keeps big
        # integers exact): no date, and PyJWT's stdlib JSON would see inf.
        raise AuthError(f"token '{name}' claim is not a finite number")
    return number


class Verifier:
    """Checks HS256 tokens signed with one secret; returns the subscriber."""

    __slots__ = ("_inner", "_outer", "_clock", "leeway", "_headers")

    def __init__(
        self, secret: str | bytes, clock: Callable[[], float] = time.time, leeway: float = LEEWAY_SECONDS
    ) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the token secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2), got {len(key)}"
            )
        # HMAC-SHA256's two keyed hash states (RFC 2104), hashed once: each
        # token copies them instead of keying a new HMAC (2.1 → 0.7 µs here).
        block = (hashlib.sha256(key).digest() if len(key) > _SHA256_BLOCK else key).ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(block.translate(_IPAD))
        self._outer = hashlib.sha256(block.translate(_OPAD))
        self._clock = clock
        self.leeway = leeway
        # Header segments that passed the header checks: a token with one of
        # them goes straight to its signature (a header's checks depend on
        # nothing but its text).
        self._headers: set[str] = set()

    def _check_header_and_signature(self, h: str, p: str, s: str) -> None:
        """The header's checks, then the signature (see :meth:`verify_claims`)."""
        try:
            header = _json(_b64url(h))
            signature = _b64url(s)
            signing_input = f"{h}.{p}".encode("ascii")
        except (ValueError, binascii.Error, UnicodeError, RecursionError):
            raise AuthError("malformed token: bad base64url or JSON") from None
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            raise AuthError("token algorithm must be HS256")
        if "crit" in header:
            raise AuthError("token header lists critical extensions, none are supported")
        if header.get("b64", True) is not True:
            raise AuthError("token payload must be base64url encoded (RFC 7797 'b64' is not supported)")
        if "kid" in header and type(header["kid"]) is not str:
            raise AuthError("token 'kid' header is not a string")
        if len(self._headers) < _HEADER_CACHE:
            self._headers.add(h)
        expected = self._hmac(signing_input)
        if not hmac.compare_digest(expected, signature):
            raise AuthError("token signature does not verify")

    def _hmac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under the secret (``hmac.digest``'s result)."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def _signature(self, h: str, p: str) -> str:
        """The canonical base64url (unpadded) HMAC-SHA256 of ``h.p``.

        Raises:
          AuthError: ``h.p`` is not ASCII (not base64url at all).
        """
        try:
            signing_input = f"{h}.{p}".encode("ascii")
        except UnicodeError:
            raise AuthError("malformed token: bad base64url or JSON") from None
        digest = self._hmac(signing_input)
        return binascii.b2a_base64(digest, newline=False).rstrip(b"=").translate(_TO_URL).decode("ascii")

    def _check_signature(self, h: str, p: str, s: str) -> None:
        """The signature of a token whose header is known good: compared as
        text with the canonical base64url of the expected one (constant
        time; the one padding character some issuers add is allowed), and
        only when it differs decoded strictly, to tell a malformed one from
        a wrong one, as :meth:`_check_header_and_signature` does."""
        expected = self._signature(h, p)
        if s.isascii() and (hmac.compare_digest(s, expected) or hmac.compare_digest(s, expected + "=")):
            return
        try:
            _b64url(s)
        except (ValueError, binascii.Error, UnicodeError):
            raise AuthError("malformed token: bad base64url or JSON") from None
        raise AuthError("token signature does not verify")

    def verify(self, token: str) -> str:
        """Return the ``sub`` claim of a valid token.

        Raises:
          AuthError: see :meth:`verify_claims`.
        """
        return self.verify_claims(token)[0]

    def verify_claims(self, token: str) -> tuple[str, int]:
        """Return the ``sub`` and ``exp`` claims of a valid token (``exp``
        in whole seconds since 1970, rounded down).

        Raises:
          AuthError: malformed, badly signed, expired, not yet valid, or
            without a ``sub`` / ``exp`` claim; ``expired`` is True on the
            error when that is the only fault.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"token longer than {MAX_TOKEN_BYTES} bytes")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("malformed token: expected a JWT of three dot-separated parts")
        h, p, s = parts
        if h in self._headers:
            self._check_signature(h, p, s)
        else:
            self._check_header_and_signature(h, p, s)
        try:
            claims = _json(_b64url(p))
        except (ValueError, binascii.Error, UnicodeError, RecursionError):
            raise AuthError("malformed token: bad claims") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed token: claims must be a JSON object")
        exp = _number(claims, "exp")
        if exp is None:
            raise AuthError("token has no 'exp' claim")
        now = self._clock()
        if exp <= now - self.leeway:
            raise AuthError("token expired", expired=True)
        for name in ("nbf", "iat"):
            t = _number(claims, name) if name in claims else None
            if t is not None and t > now + self.leeway:
                raise AuthError(f"token not valid yet ({name} is in the future)")
        if claims.get("aud"):
            # RFC 7519 §4.1.3: a token meant for some audience is not for us.
            raise AuthError("token has an audience ('aud'); mailpush accepts only tokens without one")
        if "jti" in claims and type(claims["jti"]) is not str:
            raise AuthError("token 'jti' claim is not a string")
        sub = claims.get("sub")
        if type(sub) is not str or not sub:
            raise AuthError("token has no 'sub' claim (the subscriber id)")
        return sub, int(exp)


def mint(secret: str | bytes, subscriber: str, ttl: float = 3600.0, now: float | None = None) -> str:
    """A token for ``subscriber`` valid for ``ttl`` seconds."""
    if not subscriber:
        raise ConfigError("the subscriber id must not be empty")
    if ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    issued = int(time.time() if now is None else now)
    return jwt.encode({"sub": subscriber, "iat": issued, "exp": issued + int(ttl)}, secret, algorithm="HS256")


def token_from_request(req: Request) -> str:
    """The token from ``Sec-WebSocket-Protocol`` (``mailpush.token.<jwt>``),
    ``Authorization: Bearer``, query ``token`` or the cookie, in that order.

    Raises:
      AuthError: none of them carries a token.
    """
    if req.protocols:
        for offered in req.protocols.split(","):
            offered = offered.strip(" \t")
            if offered.startswith(TOKEN_PROTOCOL_PREFIX) and len(offered) > len(TOKEN_PROTOCOL_PREFIX):
                return offered[len(TOKEN_PROTOCOL_PREFIX) :]
    if req.authorization:
        scheme, _, value = req.authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if req.query:
        found = query_param(req.query, QUERY_PARAM)
        if found:
            return found
    if req.cookie:
        found = cookie_value(req.cookie, COOKIE_NAME)
        if found:
            return found
    raise AuthError(
        f"no token: send it as subprotocol '{TOKEN_PROTOCOL_PREFIX}<token>' beside '{PROTOCOL}', query parameter"
        f" '{QUERY_PARAM}', cookie '{COOKIE_NAME}' or 'Authorization: Bearer'"
    )


def offers_protocol(req: Request) -> bool:
    """The client offered the ``mailpush.v1`` subprotocol (mailpush's own
    client does): it is answered with it, and a refused token reaches it
    as a close code it can read (a browser cannot see an HTTP status)."""
    return bool(req.protocols) and any(p.strip(" \t") == PROTOCOL for p in req.protocols.split(","))


def load_secret(secret: str | None, secret_file: str | None) -> str:
    """The secret from the option/environment or from a file (first line)."""
    if secret and secret_file:
        raise ConfigError("give either --secret or --secret-file, not both")
    if secret_file:
        try:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.readline().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --secret-file {secret_file}: {e.strerror}") from None
    if not secret:
        raise ConfigError("no token secret: set --secret, MAILPUSH_SECRET or --secret-file")
    if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2)")
    return secret
