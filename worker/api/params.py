"""Query parameters a route does not take are refused (422), not ignored.

A typo such as `GET /v1/bookings?stauts=held` would otherwise answer every booking as if
no filter had been asked for; here it is refused naming `stauts`. So is a parameter given
twice (`?status=held&status=cancelled`): each takes one value, and the framework would
read the last one only, answering the cancelled bookings as if the held ones were asked
for too.
"""

from __future__ import annotations

from collections import Counter

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from .errors import ApiError

_KNOWN: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _known(route: APIRoute) -> frozenset[str]:
    known = _KNOWN.get(id(route))
    if known is None:
        known = _KNOWN[id(route)] = frozenset(_query_names(route.dependant))
    return known


def no_unknown_query(request: Request) -> None:
    """Router dependency: 422 naming each query parameter the route does not take."""
    route = request.scope.get("route")
    known = _known(route) if isinstance(route, APIRoute) else frozenset()
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    twice = [name for name, n in Counter(names).items() if n > 1 and name in known]
    if unknown or twice:
        raise ApiError(422, "the request has invalid parameters", fields=[
            (name or "(empty name)", "unknown parameter (not one this route takes)")
            for name in unknown] + [
            (name, "given more than once (it takes one value)") for name in twice])
