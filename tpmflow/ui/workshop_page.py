"""Workshop mode: the instructor's page (admins) that opens a workshop in one step
(``tpmflow.access.workshop``, the same function as ``tpmflow workshop open``), and the Examples
page every participant lands on: ready examples that open the right page, filled in, and run.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tpmflow.access.workshop import MAX_PARTICIPANTS, open_workshop
from tpmflow.errors import TpmflowError

if TYPE_CHECKING:
    from tpmflow.ui.pages import Workbench


def routes(bench: Workbench) -> list[Any]:
    page = WorkshopPage(bench)
    return [
        Route("/ui/examples", page.examples, methods=["GET"]),
        Route("/ui/workshop", page.show, methods=["GET"]),
        Route("/ui/workshop", page.open, methods=["POST"]),
    ]


def _example(page: str, run: str, **fields: str) -> str:
    """What the Examples page hands to ``page`` (through sessionStorage, so only this origin's own
    Examples page can start one): the form (or button) ``run`` and the fields to fill first."""
    kind = "click" if page == "/ui/adapters" else "form"
    return json.dumps({"page": page, kind: run, "fields": fields})


EXAMPLES: list[dict[str, Any]] = [
    {
        "title": "Complete a molecule",
        "what": "The model continues a SMILES string, streamed token by token, with its charge and provenance.",
        "example": _example("/ui/generate", "generate", prompt="CC(=O)N", max_tokens="24", temperature="0"),
        "needs": "generate",
    },
    {
        "title": "Draw, check and embed molecules",
        "what": "Five SMILES (one broken) drawn, checked by the SMILES adapter, embedded, with nearest neighbours.",
        "example": _example(
            "/ui/adapters", "look", smiles="CCO\nc1ccccc1O\nCC(=O)Nc1ccc(O)cc1\nCC(=O)Oc1ccccc1C(=O)O\nC1CC1N("
        ),
        "needs": "embed",
    },
    {
        "title": "Generate new molecules from prefixes",
        "what": "Three samples for each of two prefixes, drawn; invalid ones say why.",
        "example": _example("/ui/adapters", "generate", smiles="c1ccccc1\nCC(=O)"),
        "needs": "embed",
    },
    {
        "title": "A logit lens",
        "what": "What the model would predict after each layer at every position of aspirin's SMILES.",
        "example": _example("/ui/inside", "lens", prompt="CC(=O)Oc1ccccc1C(=O)O", top_k="3"),
        "needs": "probe",
    },
    {
        "title": "Steer towards rings",
        "what": "Add the difference between a ring's and a chain's activations while generating; compare.",
        "example": _example("/ui/inside", "steer", plus="c1ccccc1", minus="CCCCCC", prompt="C", scale="8"),
        "needs": "probe",
    },
    {
        "title": "Swap in activations: a patching sweep",
        "what": "Which layer and position carry the difference between two prompts' next-token predictions.",
        "example": _example("/ui/inside", "patch", clean="c1ccccc1", corrupt="C1CCCCC1"),
        "needs": "probe",
    },
]


class WorkshopPage:
    def __init__(self, bench: Workbench) -> None:
        self.bench = bench

    async def examples(self, request: Request) -> Response:
        session = await self.bench._session(request)
        if session is None:
            return self.bench._to_signin(request)
        principal, csrf = session
        shown = [dict(e, allowed=principal.can(e["needs"])) for e in EXAMPLES]
        return self.bench._page("examples.html", principal, csrf, "examples", examples=shown)

    async def show(
        self, request: Request, made: list[Any] | None = None, error: str = "", status: int = 200, **form: Any
    ) -> Response:
        session = await self.bench._session(request)
        if session is None:
            return self.bench._to_signin(request)
        principal, csrf = session
        if not principal.can("admin"):  # refused here, whatever links the page shows
            return self.bench._render("error.html", status=403, message="Workshops are opened by principals with admin.")
        classes = self.bench.gw.cfg.service_classes
        page = self.bench._page(
            "workshop.html",
            principal,
            csrf,
            "admin",
            classes=sorted(classes.items(), key=lambda kv: kv[1].priority),
            made=made or [],
            error=error,
            form=form,
            max_participants=MAX_PARTICIPANTS,
            url=str(request.base_url).rstrip("/"),
        )
        page.status_code = status
        return page

    async def open(self, request: Request) -> Response:
        form = await self.bench.admin_form(request, "Workshops are opened by principals with admin.")
        if isinstance(form, Response):
            return form
        fields = {k: str(form.get(k, "")).strip() for k in ("name", "participants", "service_class", "su")}
        try:
            participants, su = int(fields["participants"]), float(fields["su"])
        except ValueError:
            return await self.show(request, error="Participants and SU must be numbers.", status=400, **fields)
        gw = self.bench.gw
        try:
            made = await asyncio.to_thread(
                open_workshop,
                gw.access,
                fields["name"],
                participants,
                fields["service_class"],
                su,
                known_classes=set(gw.cfg.service_classes),
            )
        except TpmflowError as exc:
            return await self.show(request, error=exc.message, status=exc.status_code, **fields)
        return await self.show(request, made=made, **fields)
