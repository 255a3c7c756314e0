"""Parsing `RMA_REDIS_URL` into one server, a Sentinel deployment or a Cluster (no I/O)."""

from __future__ import annotations

import pytest

from dht_bridge.errors import ConfigError
from dht_bridge.registry.topology import Topology, parse_redis_url
from dht_bridge.settings import REGISTRY_OPTIONS, RegistrySettings


def test_plain_urls_are_one_server() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://h.example:6380/1", "unix:///run/r.sock"):
        target = parse_redis_url(url)
        assert target.topology is Topology.SINGLE
        assert target.url == url
    assert parse_redis_url("rediss://h:1/0").tls


def test_sentinel_url_names_sentinels_master_and_db() -> None:
    target = parse_redis_url(
        "redis+sentinel://user:s%40cret@s1.example:26379,s2.example,[::1]:26380/mymaster/2"
        "?sentinel_password=sp"
    )
    assert target.topology is Topology.SENTINEL
    assert target.hosts == (("s1.example", 26379), ("s2.example", 26379), ("::1", 26380))
    assert (target.service_name, target.db) == ("mymaster", 2)
    assert (target.username, target.password) == ("user", "s@cret")
    assert target.sentinel_password == "sp"
    assert not target.tls
    assert "s@cret" not in repr(target)
    assert "s@cret" not in target.describe()
    assert parse_redis_url("rediss+sentinel://h/m").tls
    assert parse_redis_url("redis+sentinel://h/m").db == 0


def test_cluster_by_scheme_or_by_flag() -> None:
    target = parse_redis_url("redis+cluster://:pw@n1:7000,n2:7001")
    assert target.topology is Topology.CLUSTER
    assert target.hosts == (("n1", 7000), ("n2", 7001))
    assert target.password == "pw"
    flagged = parse_redis_url("rediss://n1:7000", cluster=True)
    assert flagged.topology is Topology.CLUSTER
    assert flagged.hosts == (("n1", 7000),)
    assert flagged.tls


def test_the_cluster_flag_comes_from_the_environment() -> None:
    environ = {"RMA_REDIS_URL": "redis://n1:7000", "RMA_REDIS_CLUSTER": "1"}
    settings = RegistrySettings.from_values(REGISTRY_OPTIONS.resolve(None, environ))
    assert settings.cluster
    assert not RegistrySettings.from_values(REGISTRY_OPTIONS.resolve(None, {})).cluster


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/",
        "redis+sentinel://h:26379",  # no master name
        "redis+sentinel://h:26379/m/0/extra",
        "redis+sentinel://h:26379/m/zero",
        "redis+sentinel:///m",  # no host
        "redis+cluster://h:notaport",
        "redis+cluster://h:7000/3",  # a cluster has db 0 only
    ],
)
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_redis_url(url)


def test_a_unix_socket_cannot_seed_a_cluster() -> None:
    with pytest.raises(ConfigError):
        parse_redis_url("unix:///run/r.sock", cluster=True)


@pytest.mark.parametrize(
    ("url", "named"),
    [("garbage", ", and has none"), ("http://user:secret@h:1/", ", not http://")],
)
def test_an_unknown_scheme_is_named_and_a_password_never_is(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match="must start with one of redis://") as refused:
        parse_redis_url(url)
    assert str(refused.value).endswith(named)
    assert "secret" not in str(refused.value)


def test_a_redis_timeout_of_zero_or_less_is_refused() -> None:
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="RMA_REDIS_TIMEOUT must be > 0"):
            RegistrySettings.from_values(REGISTRY_OPTIONS.resolve(None, {"RMA_REDIS_TIMEOUT": bad}))
    settings = RegistrySettings.from_values(
        REGISTRY_OPTIONS.resolve(None, {"RMA_REDIS_TIMEOUT": "0.5"})
    )
    assert settings.timeout == 0.5
