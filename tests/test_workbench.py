"""The web workbench (issue 18, first pages) in a real browser against a real pool: Debian's
Chromium, headless, driven by Playwright's Python package (``executable_path``; nothing
downloaded). Sign in; generate with streaming; usage, service and admin pages; a non-admin is
refused the admin page by the server; the session cookie is HttpOnly and SameSite=Strict; the API
takes the cookie only with the page's CSRF header; an XSS probe stays inert. Every page is saved
as a screenshot under ``runs/ui/`` and the sign-in page's load time is printed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tpmflow
from tpmflow.errors import Unauthorized

pytestmark = pytest.mark.engine
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "runs" / "ui"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROBE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>CC'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium (apt-get install chromium)")
        pytest.skip(f"!!! {CHROMIUM} is missing: apt-get install chromium to run the browser tests")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # Playwright gives each context a fresh profile (a new --user-data-dir of its own).
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _signed_in(browser: Any, url: str, token: str) -> Any:
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(url + "/ui")
    assert page.url.endswith("/ui/signin")
    page.fill("input[name=token]", token)
    page.click("#signin")
    page.wait_for_url("**/ui/generate")
    return page


def test_sign_in_generate_with_streaming_and_the_xss_probe_stays_inert(pool: Any, browser: Any) -> None:
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    t = time.perf_counter()
    response = page.goto(pool.url + "/ui/signin", wait_until="load")
    load_s = time.perf_counter() - t
    print(f"sign-in page loaded in {load_s * 1000:.0f} ms (aim: under 1 s)")  # a figure, not a timed assertion
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    page.screenshot(path=str(SHOTS / "signin.png"))
    page.fill("input[name=token]", "tpm_not-a-token")
    page.click("#signin")
    assert "not valid" in page.inner_text(".error")
    page.fill("input[name=token]", pool.token)
    page.click("#signin")
    page.wait_for_url("**/ui/generate")
    session = next(c for c in page.context.cookies() if c["name"].startswith("tpmflow_session_"))
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["value"].startswith("tpm_ui_") and session["value"] != pool.token, "a session, not the token"
    assert "tpm_" not in page.evaluate("document.cookie"), "page script cannot read the token"
    assert "tpm_" not in page.url and page.evaluate("JSON.stringify(localStorage)") == "{}"

    page.fill("textarea[name=prompt]", PROBE)
    page.fill("input[name=max_tokens]", "24")
    page.click("#run")
    # (a string predicate would need eval, which the CSP forbids: selectors only)
    page.wait_for_selector("#charge:not(:empty), #error:not(:empty)", timeout=60_000)
    assert page.inner_text("#error") == "", page.inner_text("#error")
    assert page.inner_text("#prompt-echo") == PROBE, "the prompt is shown as text"
    assert page.evaluate("window.__xss") is None, "nothing injected ran"
    assert page.locator("main img").count() == 0
    output = page.inner_text("#output")
    assert output and page.inner_text("#tokens").endswith("24 output"), page.inner_text("#tokens")
    assert page.inner_text("#charge").endswith("SU"), page.inner_text("#charge")
    assert page.inner_text("#replica").startswith("replica-")
    assert page.inner_text("#version").startswith("blake3:")
    page.screenshot(path=str(SHOTS / "generate.png"), full_page=True)
    # Streaming: the answer arrives in several chunks; the page saw it grow before the end.
    grew = page.evaluate(
        """async () => {
            const csrf = document.querySelector('main').dataset.csrf;
            const resp = await fetch('/v1/completions', {method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-Tpmflow-CSRF': csrf},
                body: JSON.stringify({prompt: 'C', max_tokens: 16, stream: true})});
            const reader = resp.body.getReader(); let reads = 0;
            for (;;) { const {done} = await reader.read(); if (done) break; reads++; }
            return reads;
        }"""
    )
    assert grew > 1, grew
    # The cookie alone (another site's form or script) is not enough for the API.
    without = page.evaluate(
        "fetch('/v1/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({prompt: 'C', max_tokens: 1})}).then(r => r.status)"
    )
    assert without == 401
    cookie = {session["name"]: session["value"]}
    forged = httpx.post(pool.url + "/v1/completions", json={"prompt": "C", "max_tokens": 1}, cookies=cookie)
    assert forged.status_code == 401 and "X-Tpmflow-CSRF" in forged.text
    wrong = httpx.post(
        pool.url + "/v1/completions",
        json={"prompt": "C", "max_tokens": 1},
        cookies=cookie,
        headers={"X-Tpmflow-CSRF": "0" * 40},
    )
    assert wrong.status_code == 401


def test_usage_service_and_admin_pages(pool: Any, browser: Any) -> None:
    page = _signed_in(browser, pool.url, pool.token)
    page.goto(pool.url + "/ui/usage")
    before = int(page.inner_text("#requests").split()[0])
    with pool.client() as client:
        client.generate("CCO", max_tokens=4)
    page.reload()
    after = int(page.inner_text("#requests").split()[0])
    assert after > before, (before, after)
    assert page.locator("#chart canvas").count() >= 1, "the SU chart is drawn"
    assert "completions" in page.inner_text("#by-endpoint")
    page.screenshot(path=str(SHOTS / "usage.png"), full_page=True)

    page.goto(pool.url + "/ui/service")
    rows = page.locator("#replicas tr").count() - 1
    assert rows == len(pool.gateway.registry.replicas) and "live" in page.inner_text("#replicas")
    page.screenshot(path=str(SHOTS / "service.png"), full_page=True)

    name = "ui-" + uuid.uuid4().hex[:6]
    pool.add_principal(name, "workshop", {"generate"})
    page.goto(pool.url + "/ui/admin")
    page.select_option("select[name=principal]", name)
    page.click("#make-token")
    made = page.inner_text("#created")
    assert made.startswith("tpm_") and pool.access.authenticate(made).name == name
    page.screenshot(path=str(SHOTS / "admin.png"), full_page=True)

    (session,) = [c["value"] for c in page.context.cookies() if c["name"].startswith("tpmflow_session_")]
    page.click("text=Sign out")
    page.wait_for_url("**/ui/signin")
    assert not [c for c in page.context.cookies() if c["name"].startswith("tpmflow_session_")]
    with pytest.raises(Unauthorized):
        pool.access.authenticate(session)
    page.goto(pool.url + "/ui/usage")
    assert page.url.endswith("/ui/signin"), "signed out: back to sign-in"


def test_a_non_admin_is_refused_admin_pages_by_the_server(pool: Any, browser: Any) -> None:
    name = "ui-" + uuid.uuid4().hex[:6]
    token = pool.add_principal(name, "workshop", {"generate"})
    page = _signed_in(browser, pool.url, token)
    assert page.locator("nav >> text=Admin").count() == 0
    response = page.goto(pool.url + "/ui/admin")
    assert response.status == 403 and "admin" in page.inner_text(".error")
    page.screenshot(path=str(SHOTS / "admin-refused.png"))
    # A forged POST from the page itself, CSRF token and all, is still refused: not an admin.
    status = page.evaluate(
        """async (name) => {
            const csrf = await fetch('/ui/generate').then(r => r.text())
                .then(t => new DOMParser().parseFromString(t, 'text/html').querySelector('main').dataset.csrf);
            const body = new URLSearchParams({csrf, principal: name});
            return fetch('/ui/admin/tokens', {method: 'POST', body}).then(r => r.status);
        }""",
        "pool-admin",
    )
    assert status == 403, status
    usage = page.evaluate(
        """async () => {
            const csrf = await fetch('/ui/generate').then(r => r.text())
                .then(t => new DOMParser().parseFromString(t, 'text/html').querySelector('main').dataset.csrf);
            return fetch('/v1/tpmflow/usage', {headers: {'X-Tpmflow-CSRF': csrf}}).then(r => r.json());
        }"""
    )
    assert {row["principal"] for row in usage["usage"]} <= {name}, "a non-admin sees only its own usage"
    # Revoking the token signed in with ends the session on the next page.
    assert pool.access.revoke(token) == 1
    page.goto(pool.url + "/ui/generate")
    assert page.url.endswith("/ui/signin")


def test_inside_the_model_draws_the_logit_lens_and_steering_changes_the_output(pool: Any, browser: Any) -> None:
    """The lens heatmap has one cell per layer and prompt position, each titled with its top
    tokens; a steering vector made from two prompts changes the greedy output."""
    prompt = "CC(=O)O"
    with pool.client() as client:
        trace = client.probe(prompt, lens=tpmflow.LogitLens(top_k=3))
    page = _signed_in(browser, pool.url, pool.token)
    page.click("nav >> text=Inside the model")
    page.fill("#lens input[name=prompt]", prompt)
    page.click("#run-lens")
    page.wait_for_selector("#heatmap .cell")
    cells = page.locator("#heatmap .cell")
    assert cells.count() == len(trace.lens) * len(trace.prompt_tokens)
    last = trace.lens[-1]
    first_cell = page.locator(f"#heatmap .cell[data-layer='{last['layer']}'][data-position='0']")
    assert first_cell.inner_text() == last["tokens"][0][0]
    assert first_cell.get_attribute("title").count("%") == 3, "the top 3 tokens on hover"
    page.screenshot(path=str(SHOTS / "inside-lens.png"), full_page=True)
    page.fill("#steer input[name=prompt]", "C")
    page.fill("#steer input[name=max_tokens]", "12")
    page.click("#run-steer")
    page.wait_for_selector("#with:not(:empty), #steer-error:not(:empty)", timeout=60_000)
    assert page.inner_text("#steer-error") == ""
    assert page.inner_text("#with") != page.inner_text("#without"), "the vector changed the output"
    page.screenshot(path=str(SHOTS / "inside-steering.png"), full_page=True)
    # Without the probe permission the page is refused by the server.
    token = pool.add_principal("ui-" + uuid.uuid4().hex[:6], "workshop", {"generate"})
    other = _signed_in(browser, pool.url, token)
    assert other.locator("nav >> text=Inside the model").count() == 0
    assert other.goto(pool.url + "/ui/inside").status == 403
