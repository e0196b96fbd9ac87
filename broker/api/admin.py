"""The admin web page: a read-only, server-rendered view for site admins (``/admin/``).

Pages: credentials by owner (expiring ones marked) with an activity chart, the
audit trail with filters, the loaded policy, and a "why" form running
``policy explain``.  Plain HTML forms and inline SVG: it works without
JavaScript, and the Content-Security-Policy allows none.

Access: the members of the policy group named by ``admin_group``.  They come in
with their client certificate (checked like every REST request) or, when the
server has a PAM service, through the login form; the PAM login is kept in a
signed session cookie (``__Host-`` prefixed, Secure, HttpOnly, SameSite=Strict)
that expires after ``session_lifetime``.  Every form posts a CSRF token bound to
that cookie.  Everyone else gets a 403 page that says why.  Templates escape
every value (Jinja autoescaping): DNs, job ids and reasons are attacker-chosen.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Flask,
    Request,
    Response,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from werkzeug.wrappers import Response as WerkzeugResponse

from broker.admin_service import AdminService, AdminSettings, ExplainQuery, split_lines
from broker.api.identity import authenticate_chain, pam_login, peer_chain
from broker.audit import AuditAction
from broker.errors import AuthenticationError, AuthorizationError, BrokerError, InputError
from broker.pam_auth import PamSettings
from broker.policy import Action, AuthMethod
from broker.service import BrokerService, Requester
from broker.store import admin_queries as q

AUDIT_ACTIONS = (
    *(a.value for a in Action),
    "authenticate",
    "change-passphrase",
    "issue-certificate",
    "admin-login",
    "admin-page",
)
CHART_HOURS = (6, 24, 168, 720)
_DN_MAX = 1024
_FIELD_MAX = 255
_MAX_ID = 2**62  # ids and cursors; larger numbers overflow the database's integers
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

ViewResult = str | WerkzeugResponse | tuple[str, int]


@dataclass(frozen=True)
class _Bar:
    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


def _arg(name: str, max_len: int = _FIELD_MAX, source: Any = None) -> str | None:
    value = (source if source is not None else request.args).get(name, "")
    if not isinstance(value, str):
        return None
    value = value.strip()
    if len(value) > max_len:
        raise InputError(f"the field {name!r} is longer than {max_len} characters")
    if _CONTROL.search(value):
        raise InputError(f"the field {name!r} contains control characters")
    return value or None


def _int_arg(name: str) -> int | None:
    text = _arg(name, 20)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or int(text) >= _MAX_ID:
        raise InputError(f"the field {name!r} must be a positive whole number below {_MAX_ID}")
    return int(text)


def _time_arg(name: str) -> datetime | None:
    text = _arg(name, 40)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"the field {name!r} must be a UTC date and time such as 2026-12-06T14:00"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _chart_bars(
    buckets: list[q.ChartBucket], width: int = 720, height: int = 160
) -> tuple[list[_Bar], int, list[tuple[float, str]]]:
    """Bar geometry for the inline SVG: two bars per bucket, scaled to the largest count."""
    top = max([1, *(b.retrievals for b in buckets), *(b.refusals for b in buckets)])
    slot = width / max(1, len(buckets))
    bar = max(1.0, slot / 2 - 1)
    bars: list[_Bar] = []
    labels: list[tuple[float, str]] = []
    for i, b in enumerate(buckets):
        x = i * slot
        for offset, kind, count in ((0.0, "ok", b.retrievals), (bar, "refused", b.refusals)):
            h = height * count / top
            label = "retrievals" if kind == "ok" else "refusals"
            bars.append(
                _Bar(
                    round(x + offset, 1),
                    round(height - h, 1),
                    round(bar, 1),
                    round(h, 1),
                    kind,
                    f"{b.start:%Y-%m-%d %H:%M} UTC: {count} {label}",
                )
            )
        if i % max(1, len(buckets) // 6) == 0:
            labels.append((round(x, 1), f"{b.start:%m-%d %H:%M}"))
    return bars, top, labels


class _AdminSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, keyed by the admin session key, read per request
    (so that every worker agrees, and a master-key rotation ends the sessions)."""

    def __init__(self, key: Callable[[], bytes]) -> None:
        self._key = key

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith("/admin/"):
            return None  # the REST API has no sessions: Flask uses a null one
        return super().open_session(app, request)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        return URLSafeTimedSerializer(
            self._key(),
            salt=self.salt,
            serializer=self.serializer,
            signer_kwargs={
                "key_derivation": self.key_derivation,
                "digest_method": self.digest_method,
            },
        )


def admin_blueprint(
    service: BrokerService, *, pam: PamSettings | None = None, settings: AdminSettings | None = None
) -> Blueprint:
    """The admin pages under ``/admin``, bound to ``service``; see the module docstring."""
    ui = _AdminUi(service, AdminService(service, settings or AdminSettings()), pam)
    bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")
    bp.record_once(ui.configure)
    _register_hooks(bp, ui)
    _register_login(bp, ui)
    _register_pages(bp, ui)
    return bp


class _AdminUi:
    """What every admin view shares: the session, CSRF tokens, page rendering, the caller."""

    def __init__(
        self, service: BrokerService, admin: AdminService, pam: PamSettings | None
    ) -> None:
        self.service, self.admin, self.pam = service, admin, pam

    def configure(self, state: BlueprintSetupState) -> None:
        app = state.app
        assert isinstance(app, Flask)
        app.session_interface = _AdminSessions(self.admin.session_key)
        app.config.update(
            SESSION_COOKIE_NAME="__Host-broker-admin",
            SESSION_COOKIE_SECURE=True,
            SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Strict",
            SESSION_COOKIE_PATH="/",
            PERMANENT_SESSION_LIFETIME=self.admin.settings.session_lifetime,
        )

    def csrf_token(self) -> str:
        token = session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            session["csrf"] = token
        return token

    def csrf_ok(self) -> bool:
        sent = request.form.get("csrf", "")
        token = session.get("csrf")
        return isinstance(token, str) and hmac.compare_digest(sent.encode(), token.encode())

    def page(self, template: str, status: int = 200, **context: Any) -> tuple[str, int]:
        who: Requester | None = g.get("admin_user")
        return render_template(
            f"admin/{template}",
            who=who,
            who_label=who.label if who else None,
            csrf=self.csrf_token(),
            pam_enabled=self.pam is not None,
            now=self.admin.now(),
            group=self.admin.settings.group,
            **context,
        ), status

    def message(self, status: int, title: str, text: str) -> tuple[str, int]:
        return self.page("message.html", status, title=title, text=text)

    def current_user(self) -> Requester | None:
        user, started = session.get("pam_user"), session.get("at")
        if self.pam is not None and isinstance(user, str) and isinstance(started, int | float):
            age = self.admin.now().timestamp() - started
            if 0 <= age < self.admin.settings.session_lifetime.total_seconds():
                return Requester(
                    dn=None,
                    pam_user=user,
                    client_address=request.remote_addr,
                    endpoint="rest",
                    request_id=g.get("request_id", ""),
                )
            session.clear()
        chain = peer_chain()
        if not chain:
            return None
        return authenticate_chain(self.service, chain, action=AuditAction.ADMIN_PAGE)

    def admin_only(self, view: Callable[..., ViewResult]) -> Callable[..., ViewResult]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> ViewResult:
            who = self.current_user()
            group = self.admin.settings.group
            if who is None:
                if self.pam is not None:
                    return redirect(url_for("admin.login"), code=303)
                return self.message(
                    403,
                    "Access refused",
                    "This page is for site admins: connect with the client "
                    "certificate of a member of the policy group "
                    f"'{group}'.",
                )
            try:
                self.admin.require_admin(who)
            except AuthorizationError:
                return self.message(
                    403,
                    "Access refused",
                    f"You are signed in as {who.label}, who is not a site "
                    f"admin: the admin page is only for members of the policy "
                    f"group '{group}'.",
                )
            g.admin_user = who
            return view(*args, **kwargs)

        return wrapper


def _register_hooks(bp: Blueprint, ui: _AdminUi) -> None:
    @bp.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.errorhandler(BrokerError)
    def _broker_error(exc: BrokerError) -> tuple[str, int]:
        if exc.http_status >= 500:
            return ui.message(
                exc.http_status,
                "Server problem",
                f"The broker could not answer (request {g.get('request_id')}); "
                "the administrator can find it in the log.",
            )
        if isinstance(exc, AuthenticationError):
            return ui.message(403, "Access refused", f"Your certificate was refused: {exc.message}")
        return ui.message(exc.http_status, "Bad request", exc.message)


def _register_login(bp: Blueprint, ui: _AdminUi) -> None:
    @bp.route("/login", methods=["GET", "POST"])
    def login() -> ViewResult:
        pam = ui.pam
        if pam is None:
            return ui.message(
                404,
                "No password login",
                "This broker has no PAM service configured: site admins connect "
                "with their client certificate.",
            )
        if request.method == "GET":
            return ui.page("login.html")
        if not ui.csrf_ok():
            return ui.message(
                400,
                "Form expired",
                "The login form expired or came from another site; reload the "
                "login page and try again.",
            )
        username = _arg("username", 128, request.form) or ""
        password = request.form.get("password", "")
        try:
            who = pam_login(ui.service, pam, username, password, AuditAction.ADMIN_LOGIN)
        except (AuthenticationError, InputError):
            return ui.page(
                "login.html",
                401,
                error="The username or password is wrong, or the account is locked.",
                username=username,
            )
        session.clear()
        session.permanent = True
        session["pam_user"] = username
        session["at"] = int(ui.admin.now().timestamp())
        session["csrf"] = secrets.token_urlsafe(32)  # a new token with the new session
        if ui.admin.is_admin(who):
            ui.admin.audit_login(who, reason="admin page login through PAM")
        return redirect(url_for("admin.overview"), code=303)

    @bp.post("/logout")
    def logout() -> ViewResult:
        if not ui.csrf_ok():
            return ui.message(400, "Form expired", "Reload the page and try again.")
        session.clear()
        if ui.pam is not None:
            return redirect(url_for("admin.login"), code=303)
        return ui.message(200, "Signed out", "The session cookie was removed.")


def _register_pages(bp: Blueprint, ui: _AdminUi) -> None:
    _register_overview(bp, ui)
    _register_audit(bp, ui)

    @bp.get("/policy")
    @ui.admin_only
    def policy() -> ViewResult:
        return ui.page("policy.html", view=ui.admin.policy_view())

    _register_explain(bp, ui)


def _register_overview(bp: Blueprint, ui: _AdminUi) -> None:
    """The front page: credentials (filtered, paged) and the retrieval chart."""
    admin = ui.admin

    @bp.get("/")
    @ui.admin_only
    def overview() -> ViewResult:
        owner = _arg("owner", _DN_MAX)
        expiring = request.args.get("expiring") == "1"
        after_owner, after_id = _arg("after_owner", _DN_MAX), _int_arg("after_id")
        after = (
            q.CredentialCursor(after_owner, after_id)
            if after_owner is not None and after_id is not None
            else None
        )
        hours = _int_arg("hours") or 24
        if hours not in CHART_HOURS:
            raise InputError(f"the chart covers {', '.join(map(str, CHART_HOURS))} hours")
        creds = admin.credentials(owner_dn=owner, expiring_only=expiring, after=after)
        next_url = None
        if creds.next is not None:
            params = {
                k: v
                for k, v in (
                    ("owner", owner),
                    ("expiring", "1" if expiring else None),
                    ("hours", str(hours)),
                )
                if v
            }
            params.update(after_owner=creds.next.owner_dn, after_id=str(creds.next.id))
            next_url = url_for("admin.overview") + "?" + urlencode(params)
        buckets = admin.chart(hours=hours)
        bars, top, labels = _chart_bars(buckets)
        now = admin.now()
        return ui.page(
            "overview.html",
            creds=creds,
            counts=admin.credential_counts(),
            owner=owner or "",
            expiring=expiring,
            next_url=next_url,
            soon=now + admin.settings.expiring_window,
            window_hours=admin.settings.expiring_window.total_seconds() / 3600,
            hours=hours,
            chart_hours=CHART_HOURS,
            bars=bars,
            top=top,
            labels=labels,
            totals=(sum(b.retrievals for b in buckets), sum(b.refusals for b in buckets)),
        )


def _register_audit(bp: Blueprint, ui: _AdminUi) -> None:
    """The audit log page: filtered records, paged with ``before``."""
    admin = ui.admin

    @bp.get("/audit")
    @ui.admin_only
    def audit() -> ViewResult:
        decision = _arg("decision", 16)
        if decision not in (None, "allow", "deny", "error"):
            raise InputError("the decision filter must be allow, deny or error")
        filters = q.AuditFilter(
            owner_dn=_arg("owner", _DN_MAX),
            requester_dn=_arg("requester", _DN_MAX),
            job_id=_arg("job_id"),
            action=_arg("action", 64),
            decision=decision,
            since=_time_arg("since"),
            until=_time_arg("until"),
        )
        result = admin.audit(filters, before=_int_arg("before"))
        form = {
            k: request.args.get(k, "")
            for k in ("owner", "requester", "job_id", "action", "decision", "since", "until")
        }
        next_url = None
        if result.next_before is not None:
            params = {k: v for k, v in form.items() if v}
            params["before"] = str(result.next_before)
            next_url = url_for("admin.audit") + "?" + urlencode(params)
        return ui.page(
            "audit.html", result=result, form=form, actions=AUDIT_ACTIONS, next_url=next_url
        )


def _register_explain(bp: Blueprint, ui: _AdminUi) -> None:
    admin = ui.admin

    @bp.route("/explain", methods=["GET", "POST"])
    @ui.admin_only
    def explain() -> ViewResult:
        source = request.form if request.method == "POST" else request.args
        form = {
            k: source.get(k, "")
            for k in (
                "requester",
                "fqans",
                "action",
                "owner",
                "owner_fqans",
                "credential",
                "job_id",
                "auth",
                "username",
                "retrievers",
                "trusted_retrievers",
                "renewers",
            )
        }
        form["action"] = form["action"] or Action.RETRIEVE.value
        form["auth"] = form["auth"] or AuthMethod.CERTIFICATE.value
        context: dict[str, Any] = {
            "form": form,
            "actions": [a.value for a in Action],
            "auths": [m.value for m in AuthMethod],
            "decision": None,
            "error": None,
        }
        if request.method == "GET":
            return ui.page("explain.html", **context)
        if not ui.csrf_ok():
            return ui.message(
                400,
                "Form expired",
                "The form expired or came from another site; reload it and retry.",
            )
        try:
            context["decision"] = admin.explain(_explain_query(form, source))
        except InputError as exc:
            context["error"] = exc.message
            return ui.page("explain.html", 400, **context)
        return ui.page("explain.html", **context)


def _explain_query(form: dict[str, str], source: Any) -> ExplainQuery:
    return ExplainQuery(
        action=form["action"],
        owner_dn=_arg("owner", _DN_MAX, source) or "",
        requester_dn=_arg("requester", _DN_MAX, source),
        requester_fqans=split_lines(form["fqans"]),
        owner_fqans=split_lines(form["owner_fqans"]),
        credential=_arg("credential", 128, source) or "",
        job_id=_arg("job_id", 256, source),
        auth=form["auth"],
        username=_arg("username", 128, source),
        retrievers=split_lines(form["retrievers"]) or None,
        trusted_retrievers=split_lines(form["trusted_retrievers"]) or None,
        renewers=split_lines(form["renewers"]) or None,
    )
