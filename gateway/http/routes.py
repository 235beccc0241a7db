"""Route registration: every handler goes in wrapped in the problem mapping
(`problems.with_problems`), so the app needs no middleware; one catch-all resource, added
last, answers paths nothing serves with the same problem documents (404, or 405 with
Allow)."""

from __future__ import annotations

from aiohttp import web

from gateway.http.problems import DRAIN, Drain, Handler, with_problems

UNMATCHED = "unmatched"  # the route label of answers to paths nothing serves


def _drain(app: web.Application) -> Drain:
    if DRAIN not in app:
        app[DRAIN] = Drain()
    return app[DRAIN]


class Routes:
    def __init__(self, app: web.Application) -> None:
        self._router = app.router
        self._drain = _drain(app)

    def _wrap(self, path: str, handler: Handler) -> Handler:
        return with_problems(handler, path, self._drain)

    def get(self, path: str, handler: Handler) -> None:
        self._router.add_get(path, self._wrap(path, handler))  # and HEAD

    def post(self, path: str, handler: Handler) -> None:
        self._router.add_post(path, self._wrap(path, handler))

    def put(self, path: str, handler: Handler) -> None:
        self._router.add_put(path, self._wrap(path, handler))

    def patch(self, path: str, handler: Handler) -> None:
        self._router.add_patch(path, self._wrap(path, handler))

    def delete(self, path: str, handler: Handler) -> None:
        self._router.add_delete(path, self._wrap(path, handler))


def add_fallback(app: web.Application) -> None:
    """After every other route: a path no resource serves is 404; a path served for other
    methods is 405 naming them (the router matched this resource only because the method
    did not match there)."""
    fallback = app.router.add_resource("/{unmatched:.*}")

    async def unmatched(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not fallback:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    fallback.add_route("*", with_problems(unmatched, UNMATCHED, _drain(app)))
