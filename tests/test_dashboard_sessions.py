"""Dashboard sessions and their defences (issue 13), over a small registry with no runs.

Sign-in makes a random session id (the registry keeps its hash) instead of putting the token in
the cookie; sessions expire, end at logout and with their token; every state-changing route,
login and logout included, refuses a request a browser says comes from another site; tokens
are listed and revoked from the CLI and the admin page; a site token sees no other token's name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from typer.testing import CliRunner

from fedcl.cli.main import app as cli_app
from fedcl.cli.main import main
from fedcl.server.dashboard import create_app
from fedcl.server.dashboard.auth import CSRF_HEADER, SESSION_COOKIE
from fedcl.server.registry import Registry
from fedcl.server.registry.models import DashboardSession

OWN = "http://testserver"  # TestClient's origin
FORM = {"content-type": "application/x-www-form-urlencoded"}


@dataclass
class Board:
    app: FastAPI
    registry: Registry
    tokens: dict[str, str]

    def sign_in(self, who: str, **headers: str) -> tuple[TestClient, object]:
        client = TestClient(self.app)
        response = client.post(
            "/login",
            content=f"token={self.tokens[who]}&next=/audit",
            headers={**FORM, **headers},
            follow_redirects=False,
        )
        return client, response


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    app = create_app(f"sqlite:///{tmp_path / 'registry.db'}")
    reg: Registry = app.state.registry
    try:
        tokens = {
            "admin": reg.create_token("alice", "admin"),
            "viewer": reg.create_token("victor", "viewer"),
            "site-1": reg.create_token("site one admin", "site:site-1"),
            "site-2": reg.create_token("site two admin", "site:site-2"),
        }
        reg.audit("model_hash.mismatch", "site-2 sent a stale model", site_id="site-2")
        reg.audit("run.note", "a federation-wide event")
        yield Board(app, reg, tokens)
    finally:
        reg.close()


def test_login_sets_a_session_id_not_the_token(board: Board) -> None:
    client, response = board.sign_in("admin", origin=OWN, **{"sec-fetch-site": "same-origin"})
    assert response.status_code == 303 and response.headers["location"] == "/audit"
    session_id = client.cookies[SESSION_COOKIE]
    assert (
        session_id.startswith("fedcls_")
        and board.tokens["admin"] not in response.headers["set-cookie"]
    )
    assert "Max-Age=43200" in response.headers["set-cookie"]  # 12 h
    with board.registry._sessions() as s:
        stored = s.scalars(select(DashboardSession.session_hash)).all()
    assert stored == [hashlib.sha256(session_id.encode()).hexdigest()]
    assert client.get("/api/tokens").status_code == 200
    assert "alice (admin)" in client.get("/audit").text

    # The old cookie, holding a raw token, no longer signs anyone in.
    stale = TestClient(board.app)
    stale.cookies.set(SESSION_COOKIE, board.tokens["admin"])
    assert stale.get("/api/runs").status_code == 401


CROSS_SITE = [
    {"origin": "http://evil.example"},
    {"origin": "http://testserver:8080"},  # another port: another origin
    {"origin": "null"},  # sandboxed frames and data: URLs
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site", "origin": OWN},  # a sibling subdomain
]


def test_login_and_logout_csrf_from_another_origin_are_refused(board: Board) -> None:
    """The attack of issue 13: another page auto-posts /login with the attacker's token."""
    victim, _ = board.sign_in("admin")
    for headers in CROSS_SITE:
        response = victim.post(
            "/login",
            content=f"token={board.tokens['site-1']}&next=/runs",
            headers={**FORM, **headers},
            follow_redirects=False,
        )
        assert response.status_code == 403, headers
        assert "cross-site request refused" in response.json()["detail"]
        assert "set-cookie" not in response.headers
        assert "alice (admin)" in victim.get("/audit").text  # still the victim, not site-1

        forced = victim.post("/logout", headers=headers, follow_redirects=False)
        assert forced.status_code == 403 and "set-cookie" not in forced.headers, headers
        assert victim.get("/api/runs").status_code == 200  # forced logout did nothing either
    page = victim.post("/login", headers={**FORM, **CROSS_SITE[0], "accept": "text/html"})
    assert page.status_code == 403 and 'id="refused"' in page.text  # a page for a browser


def test_cross_site_writes_are_refused_even_with_a_bearer_token(board: Board) -> None:
    client = TestClient(board.app)
    bearer = {"Authorization": f"Bearer {board.tokens['admin']}"}
    refused = client.post("/api/tokens/2/revoke", headers={**bearer, "origin": "https://x.test"})
    assert refused.status_code == 403 and "Origin 'https://x.test'" in refused.json()["detail"]
    assert board.registry.verify_token(board.tokens["viewer"]) is not None
    # No Origin and no Sec-Fetch-Site: not a browser page (curl, a script): allowed.
    assert client.post("/api/tokens/2/revoke", headers=bearer).status_code == 200
    assert board.registry.verify_token(board.tokens["viewer"]) is None
    assert (
        client.get("/api/runs", headers={**bearer, "origin": "https://x.test"}).status_code == 200
    )


def test_sessions_expire_and_end_at_logout_and_with_their_token(board: Board) -> None:
    client, _ = board.sign_in("viewer")
    copied = client.cookies[SESSION_COOKIE]
    assert client.get("/api/runs").status_code == 200
    with board.registry._engine.begin() as conn:
        conn.execute(text("UPDATE dashboard_sessions SET expires_at = '2000-01-01 00:00:00'"))
    assert client.get("/api/runs").status_code == 401
    page = client.get("/audit", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")

    client, _ = board.sign_in("viewer")
    copied = client.cookies[SESSION_COOKIE]
    logout = client.post("/logout", headers={"origin": OWN}, follow_redirects=False)
    assert logout.status_code == 303
    thief = TestClient(board.app)
    thief.cookies.set(SESSION_COOKIE, copied)
    assert thief.get("/api/runs").status_code == 401  # ended in the registry, not just dropped

    site, _ = board.sign_in("site-1")
    admin, _ = board.sign_in("admin")
    listed = {t["name"]: t for t in admin.get("/api/tokens").json()}
    assert listed["site one admin"]["sessions"] == 1 and listed["victor"]["sessions"] == 0
    token_id = listed["site one admin"]["id"]
    assert admin.post(f"/api/tokens/{token_id}/revoke").status_code == 403  # no write header
    revoked = admin.post(f"/api/tokens/{token_id}/revoke", headers={CSRF_HEADER: "1"})
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] and revoked.json()["sessions"] == 0
    assert site.get("/api/runs").status_code == 401
    (event,) = board.registry.list_audit(kind="token.revoked")
    assert event.actor == "alice" and event.site_id == "site-1"
    assert admin.post("/api/tokens/999/revoke", headers={CSRF_HEADER: "1"}).status_code == 404
    kinds = [e.kind for e in board.registry.list_audit(kind="session")]
    assert kinds.count("session.started") == 4 and kinds.count("session.ended") == 1
    assert board.registry.verify_audit().ok


def test_a_site_token_sees_no_other_tokens(board: Board) -> None:
    site, _ = board.sign_in("site-1")
    events = site.get("/api/audit").json()
    shown = " ".join(f"{e['actor']} {e['message']}" for e in events)
    for other in ("alice", "victor", "site two admin", "site-2"):
        assert other not in shown
    assert {e["kind"] for e in events} == {"token.created", "session.started", "run.note"}
    assert all(e["site_id"] in (None, "site-1") for e in events)
    page = site.get("/audit").text
    assert "site one admin" in page and "alice" not in page and "site two admin" not in page
    assert 'href="/tokens"' not in page
    assert site.get("/api/tokens").status_code == 403
    assert site.get("/tokens").status_code == 403

    admin, _ = board.sign_in("admin")
    everyone = " ".join(e["message"] for e in admin.get("/api/audit").json())
    assert "'site two admin'" in everyone and "'victor'" in everyone
    tokens_page = admin.get("/tokens").text
    assert "site two admin" in tokens_page and 'class="revoke"' in tokens_page
    viewer, _ = board.sign_in("viewer")
    assert 'class="revoke"' not in viewer.get("/tokens").text  # viewers list, never revoke


def test_cli_token_list_revoke_and_duplicate_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'r' / 'registry.db'}"
    runner = CliRunner()
    for name in ("alice", "bob"):
        made = runner.invoke(
            cli_app,
            ["dashboard", "token", "create", "--db", url, "--role", "viewer", "--name", name],
        )
        assert made.exit_code == 0, made.output
    code = main(["dashboard", "token", "create", "--db", url, "--role", "admin", "--name", "bob"])
    assert code == 2
    assert "an API token named 'bob' already exists (id 2" in " ".join(
        capsys.readouterr().err.split()
    )

    revoked = runner.invoke(cli_app, ["dashboard", "token", "revoke", "--db", url, "--name", "bob"])
    assert revoked.exit_code == 0 and "revoked token 2 ('bob'" in revoked.stderr
    listed = runner.invoke(cli_app, ["dashboard", "token", "list", "--db", url])
    assert listed.exit_code == 0
    rows = [line.split("│") for line in listed.stdout.splitlines() if "viewer" in line]
    assert [[c.strip() for c in r[1:4]] for r in rows] == [
        ["1", "alice", "viewer"],
        ["2", "bob", "viewer"],
    ]
    assert rows[0][5].strip() == "" and rows[1][5].strip() != ""  # bob's revoked time
    code = main(["dashboard", "token", "create", "--db", url, "--role", "admin", "--name", "bob"])
    assert code == 2 and "'bob' already exists (id 2, role 'viewer', revoked)" in " ".join(
        capsys.readouterr().err.split()
    )  # a revoked token keeps its name: the audit log still means it
    assert main(["dashboard", "token", "revoke", "--db", url]) == 2
    assert "exactly one of --id or --name" in capsys.readouterr().err
