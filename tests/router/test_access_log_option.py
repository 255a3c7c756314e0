"""The access log is the operator's choice: off by default (no line per request on the hot
path), on with RMA_ACCESS_LOG or --access-log."""

from __future__ import annotations

import argparse

from edge_router.config import ROUTER_OPTIONS, RouterConfig


def test_access_log_is_off_by_default_and_turned_on_by_variable_or_flag() -> None:
    assert RouterConfig.build(environ={}).access_log is False
    assert RouterConfig.build(environ={"RMA_ACCESS_LOG": "1"}).access_log is True
    parser = argparse.ArgumentParser()
    ROUTER_OPTIONS.add_to(parser)
    args = parser.parse_args(["--access-log"])
    assert RouterConfig.build(args, environ={}).access_log is True


def test_proxy_connections_are_an_option() -> None:
    config = RouterConfig.build(environ={"RMA_PROXY_MAX_CONNECTIONS": "64"})
    assert config.proxy_max_connections == 64
