"""The workbench's session: a session token in an HttpOnly, SameSite=Strict cookie (never in page
script, localStorage or a URL), and the CSRF token that goes with it.

Signing in with a tpmflow token opens a session (``AccessDB.create_session``): a token of its
own for the same principal, which expires, is revoked at sign-out and with the token it was opened
with; the long-lived token never goes into a cookie. The cookie's name carries the gateway's port
(cookies are shared by every port of a host, so two pools on one machine keep apart). It is
``Secure`` unless the browser reached the gateway by a loopback name (``gateway.secure_cookies``).

A page's script cannot read the cookie; it proves it runs on the workbench's own pages by sending
``X-Tpmflow-CSRF``, an HMAC of the session token under a key derived from the pool secret, which
the server writes into each page. The gateway's API routes accept the cookie only with that header
(``Intake.principal``), so the workbench calls exactly the routes, permissions and metering of
the API, and another site's form or script cannot ride on the cookie.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

SIGNIN_COOKIE = "tpmflow_signin"  # + the port: a random value the sign-in form must echo (login CSRF)
SIGNIN_MAX_BYTES = 16 << 10  # a sign-in form is a token and a nonce
CSRF_HEADER = "X-Tpmflow-CSRF"
CSRF_FIELD = "csrf"
SESSION_TTL_S = 8 * 3600.0  # a working day; sign in again after
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def signin_cookie(request: Request) -> str:
    """The sign-in nonce's cookie on this gateway (two gateways of one host keep their own)."""
    return f"{SIGNIN_COOKIE}_{request.url.port or 0}"


def session_cookie(request: Request) -> str:
    """The session cookie's name on this gateway (its port in it)."""
    return f"tpmflow_session_{request.url.port or 0}"


def csrf_token(secret: str, session_token: str) -> str:
    """The CSRF token of a session: new with each session, unguessable without the pool secret
    (from which its key is derived, so the key itself is nowhere else)."""
    if not secret:
        raise ValueError("the workbench needs the pool secret")
    key = hashlib.sha256(b"tpmflow-workbench-csrf:" + secret.encode()).digest()
    return hmac.new(key, session_token.encode(), hashlib.sha256).hexdigest()[:40]


def csrf_ok(secret: str, session_token: str, sent: str | None) -> bool:
    return bool(secret and session_token and sent) and hmac.compare_digest(
        csrf_token(secret, session_token), sent or ""
    )


def cookie_flags(secure: bool, max_age: float | None = None) -> dict[str, object]:
    """The session cookie's attributes."""
    flags: dict[str, object] = {"httponly": True, "samesite": "strict", "secure": secure, "path": "/"}
    if max_age is not None:
        flags["max_age"] = int(max_age)
    return flags


def secure_cookies(setting: bool | None, browser_host: str) -> bool:
    """``Secure`` cookies unless told otherwise or the browser reached the gateway by a loopback
    name (plain HTTP on this machine). A TLS proxy that keeps the Host header gets them; plain
    HTTP on a cluster network says ``gateway.secure_cookies: false``, a proxy that rewrites the
    Host to loopback ``true``."""
    return setting if setting is not None else browser_host not in LOOPBACK
