"""The HTTP side of SIRA as one ASGI app: the dashboard's files, the browser RPC
(`ConnectBridge`) and, in the embedded default, the dev sign-in.

    /sira.experiments.v1.<Service>/<Method>   Connect / gRPC-Web (POST only)
    /dev/sign-in                              dev tokens (embedded default only)
    /assets/...                               hashed bundle files, cached for a year
    anything else                             a file of the bundle, else index.html
                                              (client-side routes), never cached

Secure by default: every response carries the Content-Security-Policy below, nosniff,
no framing and no referrer; a request whose Origin is another site is refused (403)
unless that origin is listed in `SIRA_HTTP_CORS_ORIGINS`, and only then do CORS
headers appear. Tokens travel in the Authorization header only, never in a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sira_server.web.dev_sign_in import DevSignIn
from sira_server.web.origins import same_origin

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DIST_DIR",
    "RPC_PREFIX",
    "SECURITY_HEADERS",
    "build_http_app",
]

DIST_DIR = Path(__file__).resolve().parent / "dist"
"""The built dashboard (package data; `make dashboard` writes it)."""

RPC_PREFIX = "/sira.experiments.v1."
"""Every path under the API's proto package goes to the RPC bridge (404 if unknown)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)

_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_CORS_HEADERS = (
    "authorization",
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
)
_CORS_EXPOSED = ("grpc-status", "grpc-message", "grpc-status-details-bin")


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response, and `Cache-Control: no-store` to
    those that set no caching of their own (RPC answers, tokens, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in names)
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SameOrigin:
    """Refuses (403) any request whose Origin is neither the server's own nor listed."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self._allowed = frozenset(o.lower() for o in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", ()))
            origin = headers.get(b"origin")
            if origin is not None:
                text = origin.decode("latin-1")
                host = headers.get(b"host", b"").decode("latin-1")
                if not same_origin(text, host) and text.lower() not in self._allowed:
                    response = PlainTextResponse("cross-origin request refused", status_code=403)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _client_route(path: str) -> bool:
    """A path the page routes itself (`/experiments/42`): not a file, not an asset."""
    if path.split("/", 1)[0] in ("assets", "dev"):  # files and endpoints, never the page
        return False
    return "." not in path.rsplit("/", 1)[-1]


class DashboardFiles(StaticFiles):
    """The bundle, with the single-page fallback and the cache policy: hashed assets
    forever, everything else revalidated (so a new release shows at once)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        path = path.strip("/")
        if path in ("", "."):
            path = "index.html"
        try:
            response = await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404 or not _client_route(path):
                raise
            try:
                response = await super().get_response("index.html", scope)
            except HTTPException:
                return PlainTextResponse(
                    "the dashboard is not built (make dashboard)", status_code=404
                )
        if response.status_code in (200, 304):
            immutable = path.startswith("assets/")
            response.headers["cache-control"] = _IMMUTABLE if immutable else _REVALIDATE
        return response


def build_http_app(
    rpc: ASGIApp,
    *,
    dev_sign_in: DevSignIn | None,
    cors_origins: Sequence[str] = (),
    dist_dir: Path = DIST_DIR,
) -> Starlette:
    """The whole HTTP surface; `rpc` serves the paths under `RPC_PREFIX`."""
    routes: list[BaseRoute] = []
    if dev_sign_in is not None:
        routes.append(Route("/dev/sign-in", dev_sign_in.handle, methods=["GET", "POST"]))
    routes.append(
        Mount("/", app=_Dispatch(rpc, DashboardFiles(directory=dist_dir, check_dir=False)))
    )
    middleware = [Middleware(SecurityHeaders), Middleware(SameOrigin, allowed=tuple(cors_origins))]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["POST"],
                allow_headers=list(_CORS_HEADERS),
                expose_headers=list(_CORS_EXPOSED),
                max_age=600,
            )
        )
    return Starlette(routes=routes, middleware=middleware)


class _Dispatch:
    """RPC paths to the bridge, the rest to the files."""

    def __init__(self, rpc: ASGIApp, files: ASGIApp) -> None:
        self._rpc = rpc
        self._files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if path.startswith(RPC_PREFIX):
            await self._rpc(scope, receive, send)
        else:
            await self._files(scope, receive, send)
