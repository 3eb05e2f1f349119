"""``GET /admin/usage``: the usage ledger's totals as JSON, for the holder of the admin token.

The same report as ``cch usage --json`` (cch/usage/report.py): ``?since=&until=&by=key,model,day``.
Closed (403) without ``server.admin_token``: the totals name every key and what it spent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

from cch.adapters import request_gone
from cch.handler.auth import token_matches
from cch.headers import lower_headers
from cch.jsoncodec import dumps_bytes
from cch.usage.ledger import Ledger, UsageLedger
from cch.usage.report import ReportError, report
from cch.web import JsonResource, json_answer
from cch.wire import error_body

log = Logger()


class AdminUsageResource(JsonResource):
    """``GET /admin/usage``; 403 without the admin token, 404 when the ledger is off."""

    def __init__(self, ledger: Ledger, admin_token: str | None) -> None:
        super().__init__()
        self.ledger = ledger
        self.admin_token = admin_token

    def render_GET(self, request: Request) -> Any:
        if not token_matches(lower_headers(request.requestHeaders), self.admin_token):
            why = "Usage needs 'Authorization: Bearer <server.admin_token>'" + (
                "." if self.admin_token else "; set server.admin_token to serve it."
            )
            return json_answer(request, 403, error_body(why, "permission_error", "admin_forbidden"))
        if not isinstance(self.ledger, UsageLedger):
            return json_answer(
                request,
                404,
                error_body('The usage ledger is off ([usage] database = "off").', "invalid_request_error", "usage_off"),
            )
        args = {name: _arg(request, name) for name in ("since", "until", "by")}
        try:
            d = report(self.ledger, **args)
        except ReportError as exc:
            return json_answer(request, 400, error_body(str(exc), "invalid_request_error", "invalid_report"))
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    @staticmethod
    def _answer(groups: list[dict[str, Any]], request: Request) -> None:
        request.write(json_answer(request, 200, dumps_bytes(groups)))
        request.finish()

    @staticmethod
    def _failed(failure: Any, request: Request) -> Deferred[None] | None:
        if request.finished or request_gone(request):
            return None
        log.warn("admin_usage_failed", error=str(failure.value))
        request.write(
            json_answer(request, 503, error_body("The usage database did not answer.", "service_unavailable_error", "usage_unavailable"))
        )
        request.finish()
        return None


def _arg(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None
