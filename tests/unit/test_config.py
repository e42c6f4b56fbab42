"""Config: defaults, then file, then environment; a bad value names its key."""

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from townhall.core.config import (
    DEV_ENV,
    DEV_TICKET_PRIVATE_KEY,
    DEV_USER_KEY,
    MILLISECOND_KEYS,
    Config,
    ConfigError,
    Range,
    check_ranges,
    declared_ranges,
    load,
    positive,
    within,
)
from townhall.core.tickets import TicketSigner

# A ticket public key that is not the development key's.
OTHER_PUBLIC = TicketSigner("other", b"\x07" * 32, 60).public_key()


def test_defaults_are_valid() -> None:
    config = load(env={})
    assert config.relay.chunk_s == 0.1
    assert config.admission.relays == ("127.0.0.1:50052",)
    assert config.admission.host_grace_s == 60.0 and config.relay.follow_room_state is True
    assert load(env={"TOWNHALL_ADMISSION_HOST_GRACE_S": "0"}).admission.host_grace_s == 0, "0 turns it off"


def test_file_then_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "townhall.toml"
    path.write_text(
        '[relay]\nchunk_s = 0.2\n[admission]\nrelays = ["a:1", "b:2"]\nrelays_internal = ["a:3", "b:4"]\n'
    )
    config = load(path, env={"TOWNHALL_RELAY_CHUNK_S": "0.3", "TOWNHALL_LOG_JSON": "false"})
    assert config.relay.chunk_s == 0.3
    assert config.admission.relays == ("a:1", "b:2")
    assert config.log.json is False


@pytest.mark.parametrize("key", MILLISECOND_KEYS)
def test_millisecond_keys_are_refused_by_name(key: str, tmp_path: Path) -> None:
    """Every duration is in seconds: an old `_ms` key, in a file or the environment, stops the process
    naming the key to set instead (never read as seconds, never ignored)."""
    section, name = key.split(".")
    seconds = key[: -len("_ms")] + "_s"
    path = tmp_path / "townhall.toml"
    path.write_text(f"[{section}]\n{name} = 100\n")
    with pytest.raises(ConfigError, match=f"config key {key} is gone: set {seconds}, in seconds"):
        load(path, env={})
    with pytest.raises(ConfigError, match=f"config key {key} is gone: set {seconds}"):
        load(env={f"TOWNHALL_{section.upper()}_{name.upper()}": "100"})


def test_durations_are_seconds() -> None:
    """Every duration field of the config is a float number of seconds named `_s`."""
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for name, hint in hints.items():
            assert not name.endswith("_ms"), f"{section.name}.{name}: durations are in seconds"
            if name.endswith("_s") and not name.endswith("_per_s"):
                assert hint is float, f"{section.name}.{name} is {hint}, not float seconds"


def test_environment_list_is_comma_separated() -> None:
    config = load(
        env={
            "TOWNHALL_ADMISSION_RELAYS": "h1:50052, h2:50052",
            "TOWNHALL_ADMISSION_RELAYS_INTERNAL": "h1:1,h2:1",
        }
    )
    assert config.admission.relays == ("h1:50052", "h2:50052")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOWNHALL_RELAY_CHUNK_S": "fast"}, "relay.chunk_s must be a number"),
        ({"TOWNHALL_RELAY_CHUNK_S": "0.005"}, "relay.chunk_s must be within 0.02..1"),
        ({"TOWNHALL_RELAY_COLOUR": "red"}, "unknown config key relay.colour"),
        ({"TOWNHALL_NOPE_X": "1"}, "unknown config variable TOWNHALL_NOPE_X"),
        (
            {"TOWNHALL_TICKETS_KEYS": "k1=" + "x" * 40},
            "tickets.keys is gone: tickets are signed with ES256",
        ),
        ({"TOWNHALL_TICKETS_PUBLIC_KEYS": "k1=short"}, "tickets.public_keys entries must be KID=KEY"),
        ({"TOWNHALL_TICKETS_PRIVATE_KEY": "no-key-id"}, "tickets.private_key entries must be KID=KEY"),
        (
            {
                "TOWNHALL_TICKETS_PRIVATE_KEY": DEV_TICKET_PRIVATE_KEY,
                "TOWNHALL_TICKETS_PUBLIC_KEYS": OTHER_PUBLIC,
            },
            "tickets.private_key signs with key id 'dev', which tickets.public_keys does not list",
        ),
        (
            {
                "TOWNHALL_TICKETS_PRIVATE_KEY": DEV_TICKET_PRIVATE_KEY,
                "TOWNHALL_TICKETS_PUBLIC_KEYS": "dev=" + OTHER_PUBLIC.partition("=")[2],
            },
            "is not the public half of tickets.private_key 'dev'",
        ),
        ({"TOWNHALL_AUTH_KEYS": f"a={'x' * 32},a={'y' * 32}"}, "auth.keys names key id 'a' twice"),
        (
            {"TOWNHALL_AUTH_KEYS": DEV_USER_KEY, "TOWNHALL_AUTH_JWKS": __file__},
            "auth.keys holds the built-in development key next to auth.jwks",
        ),
        (
            {"TOWNHALL_ADMISSION_RELAYS": "a:1,b:1"},
            "admission.relays_internal must name the internal address",
        ),
        ({"TOWNHALL_AUTH_JWKS": "/nonexistent/jwks.json"}, "auth.jwks names '/nonexistent/jwks.json'"),
        (
            {"TOWNHALL_AUTH_SERVICE_KEYS": f"s={'x' * 32}", "TOWNHALL_AUTH_KEYS": f"u={'x' * 32}"},
            "must not reuse a secret",
        ),
        ({"TOWNHALL_AUTH_CACHE_SIZE": "-1"}, "auth.cache_size must be 0"),
        ({"TOWNHALL_TLS_ENABLED": "true"}, "tls.cert is required when tls.enabled"),
        (
            {"TOWNHALL_TLS_ENABLED": "true", "TOWNHALL_TLS_CERT": "/nonexistent.pem"},
            "tls.cert: cannot read /nonexistent.pem",
        ),
        ({"TOWNHALL_TLS_REQUIRE_CLIENT_CERT": "true"}, "tls.require_client_cert needs tls.enabled"),
        (
            {"TOWNHALL_SERVER_HEALTH_PORT": "70000"},
            r"server.health_port must be 0 \(off\) or within 1..65535, not 70000",
        ),
        ({"TOWNHALL_ADMISSION_LISTEN": "nowhere"}, "admission.listen must be host:port"),
        ({"TOWNHALL_LOG_JSON": "maybe"}, "log.json must be true or false"),
        ({"TOWNHALL_ADMISSION_MEMBERS": "a:1,nowhere"}, "admission.members must be host:port"),
        ({"TOWNHALL_ADMISSION_MEMBERSHIP": "dns"}, "admission.membership must be static or kubernetes"),
        ({"TOWNHALL_ADMISSION_MEMBERSHIP": "kubernetes"}, "admission.kube_service must name"),
        ({"TOWNHALL_ADMISSION_LEASE_MIN": "0"}, "admission.lease_min must be within"),
        ({"TOWNHALL_ADMISSION_PROBE_INTERVAL_S": "0.01"}, "admission.probe_interval_s must be within"),
        ({"TOWNHALL_ADMISSION_PROBE_FAILURES": "0"}, "admission.probe_failures must be within"),
        ({"TOWNHALL_SERVER_DRAIN_NOTICE_S": "-1"}, "server.drain_notice_s must be within"),
        ({"TOWNHALL_SERVER_KAFKA_WAIT_S": "-1"}, "server.kafka_wait_s must be within 0..3600 s"),
        ({"TOWNHALL_RELAY_UPSTREAM_LOST_S": "0.05"}, "relay.upstream_lost_s must be within"),
        ({"TOWNHALL_RELAY_MAX_FRAMES_PER_S": "0"}, "relay.max_frames_per_s must be within 1..10000"),
        ({"TOWNHALL_RELAY_FRAME_BURST_S": "600"}, "relay.frame_burst_s must be within 0.1..60"),
        (
            {"TOWNHALL_ADMISSION_HOST_GRACE_S": "0.5"},
            r"admission.host_grace_s must be 0 \(off\) or within 1..3600",
        ),
        ({"TOWNHALL_ADMISSION_HOST_GRACE_S": "soon"}, "admission.host_grace_s must be a number"),
        (
            {"TOWNHALL_ADMISSION_HOST_GRACE_S": "3", "TOWNHALL_RELAY_LOAD_REPORT_S": "2"},
            "must last at least two relay load reports",
        ),
        ({"TOWNHALL_RELAY_FOLLOW_ROOM_STATE": "sometimes"}, "relay.follow_room_state must be true or false"),
        (
            {"TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "30100", "TOWNHALL_RELAY_ADVERTISE": "127.0.0.1"},
            "relay.advertise_port_base needs relay.ordinal",
        ),
        (
            {
                "TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "30100",
                "TOWNHALL_RELAY_ADVERTISE": "127.0.0.1:30100",
                "TOWNHALL_RELAY_ORDINAL": "0",
            },
            "relay.advertise must be a host without a port",
        ),
        (
            {"TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "30100", "TOWNHALL_RELAY_ORDINAL": "0"},
            "relay.advertise must be a host without a port",
        ),
        (
            {
                "TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "65535",
                "TOWNHALL_RELAY_ADVERTISE": "h",
                "TOWNHALL_RELAY_ORDINAL": "1",
            },
            "is past port 65535",
        ),
        ({"TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "-1"}, "relay.advertise_port_base must be 0"),
        # The pod-index label missing (a cluster before Kubernetes 1.28): the variable is empty.
        ({"TOWNHALL_RELAY_ORDINAL": ""}, "relay.ordinal must be an integer"),
    ],
)
def test_bad_values_stop_with_a_message_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env=env)


@pytest.mark.parametrize(
    ("host", "ordinal", "address"),
    [
        ("127.0.0.1", "0", "127.0.0.1:30100"),
        ("127.0.0.1", "7", "127.0.0.1:30107"),
        ("[::1]", "2", "[::1]:30102"),
    ],
)
def test_a_relay_advertises_its_own_port_from_the_base_and_its_ordinal(
    host: str, ordinal: str, address: str
) -> None:
    """One host, a port per relay (kind's NodePorts): tickets are bound to base + ordinal."""
    env = {
        "TOWNHALL_RELAY_ADVERTISE": host,
        "TOWNHALL_RELAY_ADVERTISE_PORT_BASE": "30100",
        "TOWNHALL_RELAY_ORDINAL": ordinal,
    }
    relay = load(env=env).relay
    assert relay.address == address
    assert relay.internal_address == relay.internal_listen, "the pull source is not the advertised port"
    # Without a base the ordinal changes nothing: advertise is host:port as before.
    plain = load(env={"TOWNHALL_RELAY_ADVERTISE": "relay.example.com:443", "TOWNHALL_RELAY_ORDINAL": ordinal})
    assert plain.relay.address == "relay.example.com:443"


def test_unknown_section_in_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[relays]\nchunk_ms = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[relays\]"):
        load(path, env={})


def test_no_key_is_a_default_and_development_keys_are_named() -> None:
    nothing = load(env={})
    assert (nothing.auth.keys, nothing.auth.service_keys, nothing.tickets.public_keys) == ((), (), ())
    assert nothing.development_keys() == []
    assert nothing.missing_keys("relay") == ["auth.service_keys", "tickets.public_keys"]
    with pytest.raises(
        ConfigError, match=r"admission needs keys that are not configured: auth.keys \(TOWNHALL_AUTH_KEYS\)"
    ):
        nothing.require_keys("admission")
    assert load(env=DEV_ENV).development_keys() == [
        "auth.keys",
        "auth.service_keys",
        "tickets.private_key",
        "tickets.public_keys",
    ]
    own = {
        "TOWNHALL_AUTH_KEYS": "u=" + "u" * 40,
        "TOWNHALL_AUTH_SERVICE_KEYS": "s=" + "s" * 40,
        "TOWNHALL_TICKETS_PUBLIC_KEYS": OTHER_PUBLIC,
    }
    assert load(env=own).development_keys() == []
    assert load(env=own).missing_keys("relay") == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOWNHALL_LIMITS_JOINS_USER": "-1"}, r"limits.joins_user must be 0 \(no limit\) or positive"),
        ({"TOWNHALL_LIMITS_BURST_S": "0"}, "limits.burst_s must be within 0.05..3600"),
        ({"TOWNHALL_LIMITS_MAX_KEYS": "3"}, "limits.max_keys must be within 16..10000000"),
        ({"TOWNHALL_LIMITS_EXEMPT": "127.0.0.0/8,loopback"}, "limits.exempt entries must be CIDRs"),
        ({"TOWNHALL_LIMITS_IPV6_PREFIX": "129"}, "limits.ipv6_prefix must be within 1..128"),
        (
            {"TOWNHALL_SERVER_REQUEST_TIMEOUT_S": "0.01"},
            "server.request_timeout_s must be within 0.1..600",
        ),
        ({"TOWNHALL_LIMITS_FAILURES_ADDRESS": "-1"}, r"limits.failures_address must be 0 \(no limit\)"),
        ({"TOWNHALL_SERVER_MAX_CALLS_PER_ADDRESS": "0"}, "server.max_calls_per_address must be positive"),
        ({"TOWNHALL_SERVER_MAX_OPEN_STREAMS": "0"}, "server.max_open_streams must be positive"),
        ({"TOWNHALL_SERVER_OPEN_STREAM_MAX_S": "0.5"}, "server.open_stream_max_s must be within 1..86400"),
        (
            {"TOWNHALL_ADMISSION_MAX_CALLS_PER_ADDRESS": "0"},
            "admission.max_calls_per_address must be positive",
        ),
        (
            {"TOWNHALL_ADMISSION_PROBE_BUSY_FAILURES": "1"},
            "admission.probe_busy_failures must be within admission.probe_failures..1000",
        ),
    ],
)
def test_bad_limits_name_their_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env=env)


def test_limits_from_the_environment() -> None:
    config = load(
        env={"TOWNHALL_LIMITS_EXEMPT": "127.0.0.0/8, ::1/128", "TOWNHALL_LIMITS_READS_ADDRESS": "0"}
    )
    assert config.limits.enabled and config.limits.exempt == ("127.0.0.0/8", "::1/128")
    assert config.limits.reads_address == 0.0
    assert config.server.request_timeout_s == 5.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol must be one of"),
        ({"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "kafka.username is required"),
        (
            {"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TOWNHALL_KAFKA_USERNAME": "relay"},
            "kafka.password_file or kafka.password (TOWNHALL_KAFKA_PASSWORD) is required",
        ),
        (
            {
                "TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "TOWNHALL_KAFKA_USERNAME": "relay",
                "TOWNHALL_KAFKA_PASSWORD_FILE": "/nonexistent/password",
            },
            "kafka.password_file: cannot read /nonexistent/password",
        ),
        (
            {
                "TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "TOWNHALL_KAFKA_USERNAME": "relay",
                "TOWNHALL_KAFKA_PASSWORD": "p",
                "TOWNHALL_KAFKA_SASL_MECHANISM": "GSSAPI",
            },
            "kafka.sasl_mechanism must be one of",
        ),
        ({"TOWNHALL_KAFKA_USERNAME": "relay"}, "need a SASL kafka.security_protocol"),
        ({"TOWNHALL_KAFKA_CA": "/etc/ca.pem"}, "kafka.ca needs kafka.security_protocol SSL or SASL_SSL"),
        ({"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SSL", "TOWNHALL_KAFKA_CERT": "/c.pem"}, "go together"),
        (
            {"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SSL", "TOWNHALL_KAFKA_CA": "/nonexistent/ca.pem"},
            "kafka.ca: cannot read /nonexistent/ca.pem",
        ),
        ({"TOWNHALL_KAFKA_MAX_CLOCK_SKEW_S": "-1"}, "kafka.max_clock_skew_s must be within"),
    ],
)
def test_bad_kafka_security_settings_name_their_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env=env)
    assert message in str(info.value)


def test_the_kafka_password_comes_from_its_file_when_set_and_is_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")
    base = {"TOWNHALL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TOWNHALL_KAFKA_USERNAME": "admission"}
    kafka = load(env={**base, "TOWNHALL_KAFKA_PASSWORD_FILE": str(secret)}).kafka
    assert kafka.secret() == "from-the-file"
    kafka = load(env={**base, "TOWNHALL_KAFKA_PASSWORD": "from-the-env"}).kafka
    assert kafka.secret() == "from-the-env"
    assert "from-the-env" not in repr(kafka)
    secret.write_text("rotated\n")  # read when a client is made, so a rotated Secret is picked up
    assert load(env={**base, "TOWNHALL_KAFKA_PASSWORD_FILE": str(secret)}).kafka.secret() == "rotated"


# Number fields with no range of their own: checked against other fields by their section's validate.
UNRANGED = {"admission.lease_max", "relay.ordinal"}


def _ranged_fields() -> list[tuple[str, str, Range]]:
    return [
        (section.name, name, declared)
        for section in dataclasses.fields(Config)
        for name, declared in declared_ranges(section.default_factory).items()
    ]


def test_every_number_field_declares_its_range() -> None:
    """A new number key cannot be added without saying which values it takes (or why it has no range)."""
    ranged = {f"{section}.{name}" for section, name, _ in _ranged_fields()}
    for section in dataclasses.fields(Config):
        for name, hint in typing.get_type_hints(section.default_factory).items():
            key = f"{section.name}.{name}"
            if hint in (int, float):
                assert key in ranged or key in UNRANGED, f"{key} declares no Range"


def test_defaults_are_within_their_declared_ranges() -> None:
    for section in dataclasses.fields(Config):
        check_ranges(section.name, section.default_factory())


@pytest.mark.parametrize(
    ("section", "name", "declared"), _ranged_fields(), ids=[f"{s}.{n}" for s, n, _ in _ranged_fields()]
)
def test_each_declared_range_refuses_just_outside_and_takes_its_bounds(
    section: str, name: str, declared: Range
) -> None:
    """Each declared bound is where the check starts: the bound passes, a step past it fails naming the
    key, the range and the value."""
    default = getattr(Config(), section)
    low = getattr(default, declared.low) if isinstance(declared.low, str) else declared.low
    high = getattr(default, declared.high) if isinstance(declared.high, str) else declared.high
    step = 0.01 if isinstance(getattr(default, name), float) else 1
    if declared.open_low:
        check_ranges(section, dataclasses.replace(default, **{name: low + step}))
    else:
        check_ranges(section, dataclasses.replace(default, **{name: low}))
    below = low if declared.open_low else low - step
    if declared.zero is None or below != 0:
        with pytest.raises(ConfigError, match=rf"^{section}\.{name} must be .*, not "):
            check_ranges(section, dataclasses.replace(default, **{name: below}))
    if high is not None:
        check_ranges(section, dataclasses.replace(default, **{name: high}))
        with pytest.raises(ConfigError, match=rf"^{section}\.{name} must be .*within"):
            check_ranges(section, dataclasses.replace(default, **{name: high + step}))
    if declared.zero is not None:
        check_ranges(section, dataclasses.replace(default, **{name: 0}))


@pytest.mark.parametrize(
    ("declared", "name", "value", "message"),
    [
        (positive(), "inbox_queue", 0, "x.inbox_queue must be positive, not 0"),
        (
            positive(zero="off"),
            "load_report_s",
            -1.5,
            "x.load_report_s must be 0 (off) or positive, not -1.5",
        ),
        (positive(zero=""), "leeway_s", -1, "x.leeway_s must be 0 or positive, not -1"),
        (
            within(0.05, 60),
            "probe_interval_s",
            0.01,
            "x.probe_interval_s must be within 0.05..60 seconds, not 0.01",
        ),
        (within(16, 10_000_000), "max_keys", 3, "x.max_keys must be within 16..10000000, not 3"),
        (within(1, 10), "max_frames_per_s", 11, "x.max_frames_per_s must be within 1..10, not 11"),
        (within(2), "tree_degree", 1, "x.tree_degree must be at least 2, not 1"),
        (
            within(1, 3_600, zero="off"),
            "host_grace_s",
            0.5,
            "x.host_grace_s must be 0 (off) or within 1..3600 seconds, not 0.5",
        ),
        (
            within("low", 1_000),
            "high",
            1,
            "x.high must be within x.low..1000, not 1",
        ),
    ],
)
def test_a_declared_range_says_the_key_the_range_and_the_value(
    declared: Range, name: str, value: float, message: str
) -> None:
    owner = types.SimpleNamespace(**{name: value, "low": 2})
    with pytest.raises(ConfigError) as info:
        declared.check("x", name, owner)
    assert str(info.value) == message


def test_a_range_may_name_another_field_of_its_section() -> None:
    with pytest.raises(
        ConfigError, match=r"admission.lease_min must be within 1..admission.lease_max, not 9"
    ):
        load(env={"TOWNHALL_ADMISSION_LEASE_MIN": "9", "TOWNHALL_ADMISSION_LEASE_MAX": "8"})
    assert load(env={"TOWNHALL_ADMISSION_LEASE_MIN": "8", "TOWNHALL_ADMISSION_LEASE_MAX": "8"})
    with pytest.raises(ConfigError, match=r"relay.large_room_chunk_s must be 0 or within relay.chunk_s..1"):
        load(env={"TOWNHALL_RELAY_CHUNK_S": "0.2", "TOWNHALL_RELAY_LARGE_ROOM_CHUNK_S": "0.1"})


def test_max_relays_holds_the_seed_relays() -> None:
    with pytest.raises(ConfigError, match=r"admission.max_relays must be within 1..100000, not 0"):
        load(env={"TOWNHALL_ADMISSION_MAX_RELAYS": "0"})
    seeds = {"TOWNHALL_ADMISSION_RELAYS": "a:1,b:1", "TOWNHALL_ADMISSION_RELAYS_INTERNAL": "a:2,b:2"}
    with pytest.raises(
        ConfigError, match=r"admission.max_relays must be at least 2 \(the seed relays\), not 1"
    ):
        load(env={**seeds, "TOWNHALL_ADMISSION_MAX_RELAYS": "1"})
