"""Dev sign-in: the embedded default mints a short-lived token for a chosen role, so a
person trying SIRA on their machine needs no identity provider.

Offered only where the server holds the development secret (`auth.ensure_dev_secret`,
embedded stores, HS256) and the HTTP port is bound to loopback. Requests must come from
a loopback host name (a DNS-rebinding page names its own host) and, when a browser sends
an Origin, from the server's own origin; the body must be JSON, which a cross-site form
cannot send without a preflight that is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sira_server import rbac
from sira_server.auth import mint_token
from sira_server.domain.text_rules import Text, text_problem
from sira_server.web.origins import is_loopback_host, same_origin

__all__ = ["DEV_ROLES", "DEV_TOKEN_SECONDS", "DevSignIn"]

DEV_TOKEN_SECONDS = 3600
"""Lifetime of a dev sign-in token: an hour, then the page asks again."""

DEV_ROLES: tuple[str, ...] = (rbac.OPS_ADMIN, rbac.MARKETING, rbac.DATA_SCIENCE)
"""The people's roles (the modules' roles are for services, not for a page)."""

_MAX_BODY_BYTES = 1024
_SUBJECT = Text(64)


def _refuse(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


class DevSignIn:
    """`GET /dev/sign-in`: the roles on offer; `POST /dev/sign-in` `{"role": ...}`: a token."""

    def __init__(
        self,
        secret: str,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        roles: Sequence[str] = DEV_ROLES,
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._issuer = issuer
        self._roles = tuple(roles)

    async def handle(self, request: Request) -> Response:
        """The Starlette endpoint of `/dev/sign-in`."""
        host = request.headers.get("host", "")
        if not is_loopback_host(host):
            return _refuse(403, "dev sign-in answers on localhost only")
        origin = request.headers.get("origin")
        if origin is not None and not same_origin(origin, host):
            return _refuse(403, "cross-origin requests are refused")
        if request.method == "GET":
            return JSONResponse({"roles": list(self._roles)}, headers={"Cache-Control": "no-store"})
        return await self._sign_in(request)

    async def _sign_in(self, request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return _refuse(415, 'send the role as JSON: {"role": "marketing"}')
        body = b""
        async for chunk in request.stream():  # read no more than the limit, whatever is sent
            body += chunk
            if len(body) > _MAX_BODY_BYTES:
                return _refuse(413, f"the body must be at most {_MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _refuse(400, "the body is not JSON")
        role = payload.get("role") if isinstance(payload, dict) else None
        if role not in self._roles:
            return _refuse(400, f"role must be one of {', '.join(self._roles)}")
        subject = payload.get("subject") or f"dev-{role}"
        if not isinstance(subject, str) or text_problem(subject, _SUBJECT) is not None:
            return _refuse(400, "subject must be a short printable name")
        token = mint_token(
            self._secret,
            subject=subject,
            roles=[role],
            ttl_seconds=DEV_TOKEN_SECONDS,
            audience=self._audience,
            issuer=self._issuer,
        )
        expires = datetime.fromtimestamp(int(time.time()) + DEV_TOKEN_SECONDS, UTC)
        return JSONResponse(
            {
                "token": token,
                "expires_at": expires.isoformat().replace("+00:00", "Z"),
                "subject": subject,
                "roles": [role],
            },
            headers={"Cache-Control": "no-store"},
        )
