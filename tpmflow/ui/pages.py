"""The workbench's pages under ``/ui``, served by the gateway itself: server-rendered Jinja2
templates (autoescaped: model output, SMILES and names are untrusted), vendored static files, no
inline script (the Content-Security-Policy forbids it).

Pages read what they show on the server with the signed-in principal's rights; everything a page
*does* (generate, ...) its script asks of the gateway's own API routes with the session cookie
and the CSRF header (``tpmflow.ui.session``), so permissions, limits and metering are the API's.
Admin pages refuse non-admins here, on the server, not by hiding links.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tpmflow.access import Principal
from tpmflow.errors import TpmflowError
from tpmflow.ui import adapters_page, campaigns_page, versions_page, workshop_page
from tpmflow.ui.session import (
    CSRF_FIELD,
    SESSION_TTL_S,
    SIGNIN_MAX_BYTES,
    cookie_flags,
    csrf_ok,
    csrf_token,
    secure_cookies,
    session_cookie,
    signin_cookie,
)

if TYPE_CHECKING:
    from tpmflow.gateway.app import Gateway

HERE = Path(__file__).parent
CHART_ROWS = 5000  # the newest ledger rows drawn on the usage page
SLO_WINDOW_S = 24 * 3600.0  # the Service page's SLO report and latency chart
# No inline script or style, no other origin, no framing: an injected tag can neither run nor load.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
)


class Workbench:
    """The pages of one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # -- plumbing -----------------------------------------------------------------------------

    def routes(self) -> list[Any]:
        return [
            Route("/ui", self.home, methods=["GET"]),
            Route("/ui/signin", self.signin_page, methods=["GET"]),
            Route("/ui/signin", self.signin, methods=["POST"]),
            Route("/ui/signout", self.signout, methods=["POST"]),
            Route("/ui/generate", self.generate_page, methods=["GET"]),
            Route("/ui/usage", self.usage_page, methods=["GET"]),
            Route("/ui/service", self.service_page, methods=["GET"]),
            Route("/ui/inside", self.inside_page, methods=["GET"]),
            Route("/ui/admin", self.admin_page, methods=["GET"]),
            Route("/ui/admin/tokens", self.admin_token, methods=["POST"]),
            Route("/ui/admin/topup", self.admin_topup, methods=["POST"]),
            *adapters_page.routes(self),
            *versions_page.routes(self),
            *campaigns_page.routes(self),
            *workshop_page.routes(self),
            Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static"),
        ]

    def _render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = _templates.get_template(name).render(model=self.gw.model_name, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    async def _session(self, request: Request) -> tuple[Principal, str] | None:
        """The signed-in principal and its CSRF token, or None (no cookie, or a revoked token)."""
        token = request.cookies.get(session_cookie(request), "")
        if not token or not self.gw.secret:
            return None
        try:
            principal = self.gw.access.cached(token) or await asyncio.to_thread(self.gw.access.authenticate, token)
        except TpmflowError:
            return None
        return principal, csrf_token(self.gw.secret, token)

    def _page(self, name: str, principal: Principal, csrf: str, active: str, **context: Any) -> HTMLResponse:
        return self._render(
            name,
            principal=principal,
            csrf=csrf,
            active=active,
            admin=principal.can("admin"),
            probe=principal.can("probe"),
            **context,
        )

    def _secure(self, request: Request) -> bool:
        return secure_cookies(self.gw.cfg.gateway.secure_cookies, request.url.hostname or "")

    @staticmethod
    def _to_signin(request: Request) -> RedirectResponse:
        """To the sign-in page, dropping a session cookie that no longer works (expired, revoked)."""
        response = RedirectResponse("/ui/signin", status_code=303, headers=SECURITY_HEADERS)
        if session_cookie(request) in request.cookies:
            response.delete_cookie(session_cookie(request), path="/")
        return response

    # -- sign in and out ----------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        if await self._session(request) is None:
            return self._to_signin(request)
        return RedirectResponse("/ui/generate", status_code=303, headers=SECURITY_HEADERS)

    async def signin_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self._render("signin.html", status=status, nonce=nonce, error=error)
        flags = cookie_flags(self._secure(request), max_age=600)
        response.set_cookie(signin_cookie(request), nonce, **flags)  # type: ignore[arg-type]
        return response

    async def signin(self, request: Request) -> Response:
        if int(request.headers.get("content-length") or SIGNIN_MAX_BYTES + 1) > SIGNIN_MAX_BYTES:
            return await self.signin_page(request, "That sign-in form is too large.", 413)
        form = await request.form(max_files=0, max_fields=8)
        nonce = request.cookies.get(signin_cookie(request), "")
        if not nonce or not secrets.compare_digest(nonce, str(form.get("nonce", ""))):
            return await self.signin_page(request, "The sign-in form expired; try again.", 400)
        token = str(form.get("token", "")).strip()
        try:  # a session of its own: the token signed in with never goes into the cookie
            session = await asyncio.to_thread(self.gw.access.create_session, token, SESSION_TTL_S)
        except TpmflowError:
            return await self.signin_page(request, "That token is not valid here.", 401)
        response = RedirectResponse("/ui/generate", status_code=303, headers=SECURITY_HEADERS)
        flags = cookie_flags(self._secure(request), max_age=SESSION_TTL_S)
        response.set_cookie(session_cookie(request), session, **flags)  # type: ignore[arg-type]
        response.delete_cookie(signin_cookie(request), path="/")
        return response

    async def signout(self, request: Request) -> Response:
        """Ends the session: its token is revoked (on every gateway of the pool) and the cookie dropped."""
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)  # already over (expired, revoked): only the cookie to drop
        form = await request.form()
        token = request.cookies.get(session_cookie(request), "")
        if not csrf_ok(self.gw.secret, token, str(form.get(CSRF_FIELD, ""))):
            return self._render("error.html", status=403, message="Sign-out needs the form of a workbench page.")
        await asyncio.to_thread(self.gw.access.revoke, token)
        return self._to_signin(request)

    # -- pages ----------------------------------------------------------------------------------

    async def generate_page(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, csrf = session
        return self._page("generate.html", principal, csrf, "generate", may_generate=principal.can("generate"))

    async def usage_page(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, csrf = session
        gw = self.gw
        await asyncio.to_thread(gw.ledger.flush)
        everyone = principal.can("admin")
        who = None if everyone else principal.name
        totals = await asyncio.to_thread(gw.access.usage, "project" if everyone else "principal", who, charges=True)
        rows = await asyncio.to_thread(gw.access.recent_rows, who, CHART_ROWS)
        allocations = await asyncio.to_thread(gw.access.allocations.show, None if everyone else principal.project)
        for a in allocations:
            a["period"] = f"{time.strftime('%Y-%m-%d', time.gmtime(a['starts']))} to {time.strftime('%Y-%m-%d', time.gmtime(a['ends']))}"
        by_endpoint: dict[str, dict[str, float]] = {}
        for r in rows:
            e = by_endpoint.setdefault(r.endpoint, {"requests": 0, "tokens": 0, "su": 0.0})
            e["requests"] += 1
            e["tokens"] += r.prompt_tokens + r.output_tokens
            e["su"] += r.charge_su or 0.0
        spent, series = 0.0, {"t": [], "su": []}
        for r in rows:
            spent += r.charge_su or 0.0
            series["t"].append(round(r.created, 3))
            series["su"].append(round(spent, 6))
        return self._page(
            "usage.html",
            principal,
            csrf,
            "usage",
            everyone=everyone,
            allocations=allocations,
            totals=totals,
            by_endpoint=sorted(by_endpoint.items()),
            requests=len(rows),
            series=json.dumps(series),
        )

    async def service_page(self, request: Request) -> Response:
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, csrf = session
        now = time.monotonic()
        live = {r.info.replica_id for r in self.gw.registry.live()}
        replicas = [
            {
                "id": r.info.replica_id,
                "group": r.info.group,
                "task": r.info.task,
                "model": r.info.model,
                "version": r.info.content_hash[:19],
                "shape": f"TP={r.info.tensor_parallel} PP={r.info.pipeline_parallel}",
                "state": "live" if r.info.replica_id in live else ("draining" if r.draining else "down"),
                "inflight": r.inflight,
                "queued": r.info.waiting,
                "served": r.served,
                "seen_s": round(now - r.last_seen, 1),
                "probes": r.info.probes or "",
            }
            for r in sorted(self.gw.registry.replicas.values(), key=lambda r: r.info.replica_id)
        ]
        now_wall = time.time()
        report, latency = await asyncio.to_thread(self._slo_and_latency, now_wall)
        return self._page(
            "service.html",
            principal,
            csrf,
            "service",
            replicas=replicas,
            report=report,
            window_h=SLO_WINDOW_S / 3600,
            latency=json.dumps(latency),
        )

    def _slo_and_latency(self, now: float) -> tuple[Any, dict[str, list[float | None]]]:
        """Each service class's SLO report over the last SLO_WINDOW_S (as ``tpmflow slo report``),
        and answered requests' latency p50/p95 per minute over the same window, for the chart."""
        import numpy as np
        from sqlalchemy import select

        from tpmflow.access.slo import slo_report
        from tpmflow.access.tables import LedgerEntry

        gw = self.gw
        gw.ledger.flush()
        since = now - SLO_WINDOW_S
        report = slo_report(gw.access.engine, gw.cfg.service_classes, since, now)
        query = select(LedgerEntry.created, LedgerEntry.latency_ms).where(
            LedgerEntry.created >= since, LedgerEntry.status == 200, LedgerEntry.latency_ms.is_not(None)
        )
        with gw.access.engine.connect() as conn:
            rows = conn.execute(query).all()
        minutes: dict[int, list[float]] = {}
        for created, latency_ms in rows:
            minutes.setdefault(int(created // 60), []).append(float(latency_ms))
        series: dict[str, list[float | None]] = {"t": [], "p50": [], "p95": [], "n": []}
        for minute in sorted(minutes):
            p50, p95 = np.percentile(minutes[minute], [50, 95])
            series["t"].append(minute * 60.0)
            series["p50"].append(round(float(p50), 1))
            series["p95"].append(round(float(p95), 1))
            series["n"].append(float(len(minutes[minute])))
        return report, series

    async def inside_page(self, request: Request) -> Response:
        """The logit lens and the steering playground: for principals with ``probe`` (refused
        here for others; the probe route refuses them too)."""
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, csrf = session
        if not principal.can("probe"):
            return self._render("error.html", status=403, message="Inside the model needs the probe permission.")
        return self._page("inside.html", principal, csrf, "inside")

    async def admin_page(
        self, request: Request, created: str = "", error: str = "", status: int = 200, notice: str = ""
    ) -> Response:
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, csrf = session
        if not principal.can("admin"):  # refused here, whatever links the page shows
            return self._render("error.html", status=403, message="The admin page is for principals with admin.")
        principals = await asyncio.to_thread(self.gw.access.principals)
        allocations = await asyncio.to_thread(self.gw.access.allocations.show, None)
        page = self._page(
            "admin.html",
            principal,
            csrf,
            "admin",
            principals=principals,
            allocations=allocations,
            created=created,
            error=error,
            notice=notice,
        )
        page.status_code = status
        return page

    async def admin_form(
        self, request: Request, refusal: str = "The admin page is for principals with admin."
    ) -> FormData | Response:
        """The form of an admin's POST, or the response that refuses it: signed out (to sign-in),
        no CSRF token of this session (403), or no ``admin`` (403, here on the server)."""
        session = await self._session(request)
        if session is None:
            return self._to_signin(request)
        principal, _ = session
        form = await request.form()
        token = request.cookies.get(session_cookie(request), "")
        if not csrf_ok(self.gw.secret, token, str(form.get(CSRF_FIELD, ""))):
            return self._render("error.html", status=403, message="That form did not come from a workbench page.")
        if not principal.can("admin"):
            return self._render("error.html", status=403, message=refusal)
        return form

    async def admin_token(self, request: Request) -> Response:
        """A token for a principal, made as ``tpmflow tokens create`` makes it (shown once)."""
        form = await self.admin_form(request)
        if isinstance(form, Response):
            return form
        name = str(form.get("principal", "")).strip()
        try:
            created = await asyncio.to_thread(self.gw.access.create_token, name)
        except (TpmflowError, KeyError, ValueError) as exc:
            return await self.admin_page(request, error=f"No token made for {name!r}: {exc}", status=400)
        return await self.admin_page(request, created=created)

    async def admin_topup(self, request: Request) -> Response:
        """SUs added to a project's current allocation, as ``tpmflow allocations topup`` adds them."""
        form = await self.admin_form(request)
        if isinstance(form, Response):
            return form
        project = str(form.get("project", "")).strip()
        try:
            su = float(str(form.get("su", "")))
        except ValueError:
            su = math.nan
        if not (math.isfinite(su) and 0 < su <= 1e9):
            return await self.admin_page(request, error="SU must be a positive number, at most 1e9.", status=400)
        try:
            row = await asyncio.to_thread(self.gw.access.allocations.topup, project, su)
        except TpmflowError as exc:
            return await self.admin_page(request, error=f"No top-up for {project!r}: {exc.message}", status=400)
        return await self.admin_page(request, notice=f"{project}: {su:g} SU added; {row['balance_su']:g} SU left.")
