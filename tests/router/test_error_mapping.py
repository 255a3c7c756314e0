"""Every exception class of the project sits in one tree, and every one the router can meet
(those of dht_bridge and edge_router: it imports nothing else) is answered on purpose: none
becomes a 500, and only unmapped errors (bugs) have their text hidden from the client."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from types import ModuleType

import pytest

import dht_bridge
import edge_router
import rma
import worker
from dht_bridge.errors import RMAError
from edge_router.errors import RouterError, error_response, status_for

PACKAGES = (dht_bridge, edge_router, worker, rma)
# Bases that are never raised themselves.
BASES = {RMAError, RouterError}


def project_modules() -> list[ModuleType]:
    """Every module of the project, imported (so that every exception class is defined)."""
    modules = []
    for package in PACKAGES:
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue  # running it is its import
            modules.append(importlib.import_module(info.name))
    return modules


def project_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in the project's modules."""
    found: dict[str, type[BaseException]] = {}
    for module in project_modules():
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return list(found.values())


EXCEPTIONS = project_exceptions()


def test_the_walk_finds_the_core_and_router_errors() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"RegistryError", "IdentityError", "NotListening", "NoProvider"} <= names


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: cls.__qualname__)
def test_every_project_exception_is_an_rma_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, RMAError), f"{cls.__module__}.{cls.__qualname__} is outside the tree"


ROUTER_MEETS = [
    c
    for c in EXCEPTIONS
    if c not in BASES and c.__module__.startswith(("dht_bridge.", "edge_router."))
]


def instance(cls: type[BaseException]) -> BaseException:
    """`cls` built with 'what went wrong' for each text argument (and 400 for a status)."""
    args = [
        400 if param.annotation in (int, "int") else "what went wrong"
        for param in inspect.signature(cls.__init__).parameters.values()
        if param.name != "self" and param.kind is param.POSITIONAL_OR_KEYWORD
    ]
    return cls(*args) if args else cls("what went wrong")


@pytest.mark.parametrize("cls", ROUTER_MEETS, ids=lambda cls: cls.__qualname__)
def test_every_error_the_router_can_meet_maps_to_a_status_that_is_not_500(
    cls: type[BaseException],
) -> None:
    exc = instance(cls)
    status, code = status_for(exc)
    assert status != 500, f"{cls.__qualname__} is answered 500"
    assert code != "internal"
    body = json.loads(bytes(error_response(exc).body))
    assert body["error"] == code
    assert "what went wrong" in body["detail"]


@pytest.mark.parametrize("exc", [RMAError("secret"), RouterError("secret"), ValueError("secret")])
def test_an_unmapped_error_is_a_500_that_hides_its_text(exc: Exception) -> None:
    response = error_response(exc)
    assert response.status_code == 500
    assert json.loads(bytes(response.body)) == {"error": "internal", "detail": "internal error"}
