"""Tests for cch.config: TOML loading, CCH_* overrides, validation messages, helpers."""

from __future__ import annotations

import dataclasses
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs

from cch.config import (
    BreakerConfig,
    ClientKey,
    ClusterConfig,
    Config,
    ConfigError,
    ContinuityConfig,
    KeyLimitsConfig,
    LimitsConfig,
    PriceConfig,
    ProviderConfig,
    ServerConfig,
    TracingConfig,
    TunnelConfig,
    UpstreamWebSocketConfig,
    UsageConfig,
    config_schema,
    demo_config,
    is_loopback_endpoint,
    load_config,
)

PROVIDER = '[[providers]]\nname = "p"\nbase_url = "https://api.example.com/v1"\n'
KEY = '[[keys]]\nname = "alice"\nkey = "sk-cch-alice-0123456789"\n'
PRICE = '[[prices]]\nmodel = "gpt-5"\ninput_per_mtok = 1.25\noutput_per_mtok = 10.0\n'
# The server section as loaded with no replica name given: this host's name.
DEFAULT_SERVER = ServerConfig(replica=socket.gethostname())

FULL_EXAMPLE = """
[server]
listen = "tcp:9090:interface=127.0.0.1"
websocket = false
drain_timeout = 12
replica = "eu-1"

[[keys]]
name = "alice"
key = "sk-cch-alice-0123456789"
websocket = false
requests_per_minute = 10
models = ["gpt-5.5"]

[[keys]]
name = "bob"
key = "sk-cch-bob-0123456789"

[[providers]]
name = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
priority = 0
weight = 3
websocket = "on"
models = ["gpt-5.5", "gpt-5.5-mini"]
headers = { "x-team" = "a", "OpenAI-Beta" = "responses=v1" }
connect_timeout = 5
first_byte_timeout = 45.5
idle_timeout = 120

[[providers]]
name = "backup"
base_url = "http://10.0.0.2:8000/v1"
api_key = "sk-backup"
priority = -1

[limits]
max_message_bytes = 1000
max_pending_frames = 2
max_pending_bytes = 3000
outbound_send_timeout = 4
max_request_body_bytes = 5000
max_json_response_bytes = 6000
auto_ping_interval = 7
auto_ping_timeout = 8

[breaker]
failure_threshold = 9
cooldown = 10

[tunnel]
mode = "http"
url = "http://127.0.0.1:9090/v1/responses"
secret = "file-secret-0123456789abcdefghijklmn"

[upstream_websocket]
enabled = false
handshake_timeout = 11
first_event_timeout = 12
pool_max_entries = 13
idle_timeout = 14
unsupported_ttl = 15
max_buffer_bytes = 16

[usage]
database = "postgresql://cch@db.internal:5432/cch"
flush_interval = 0.5
max_pending_rows = 17
spill_file = "/var/lib/cch/spill.jsonl"
admin_report = false

[[prices]]
model = "gpt-5.5"
input_per_mtok = 1.25
cached_input_per_mtok = 0.125
output_per_mtok = 10

[[prices]]
model = "gpt-5.5-mini"
input_per_mtok = 0.25
output_per_mtok = 2.0

[key_defaults]
max_connections = 8
max_concurrent_turns = 4
requests_per_minute = 60
tokens_per_minute = 200000
tokens_per_day = 5000000
budget_per_month = 50
models = ["gpt-5.5", "gpt-5.5-mini"]
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load files by the relative name cch.toml so messages read as users see them."""
    monkeypatch.chdir(tmp_path)


def load(text: str, env: dict[str, str] | None = None, **kwargs: Any) -> Config:
    Path("cch.toml").write_text(text, encoding="utf-8")
    return load_config("cch.toml", {} if env is None else env, **kwargs)


def error(text: str, env: dict[str, str] | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, env, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def env_error(env: dict[str, str], text: str = "") -> str:
    return error(text, env)


# --- defaults and a full file ------------------------------------------------------------------


def test_no_file_gives_every_default() -> None:
    config = load_config(None, {})
    assert config.server == DEFAULT_SERVER
    assert config.keys == () and config.providers == ()
    assert config.usage == UsageConfig() and config.usage.enabled
    assert config.prices == () and config.key_defaults == KeyLimitsConfig()
    assert config.limits == LimitsConfig()
    assert config.breaker == BreakerConfig()
    assert config.upstream_websocket == UpstreamWebSocketConfig()
    assert (config.tunnel.mode, config.tunnel.url) == ("in-process", None)
    assert config.source == "<defaults>"
    assert not config.auth_required


def test_defaults_are_the_documented_values() -> None:
    assert ServerConfig() == ServerConfig("tcp:8080:interface=127.0.0.1", True, 30.0)
    assert LimitsConfig() == LimitsConfig(
        32 * 2**20, 64, 64 * 2**20, 30.0, 100 * 2**20, 64 * 2**20, 25.0, 20.0
    )
    assert BreakerConfig() == BreakerConfig(5, 30.0)
    assert TunnelConfig() == TunnelConfig("in-process", None, "")
    assert UpstreamWebSocketConfig() == UpstreamWebSocketConfig(
        True, 10.0, 20.0, 512, 3900.0, 300.0, 8 * 2**20
    )
    provider = ProviderConfig(name="p", base_url="http://x")
    assert (provider.api_key, provider.priority, provider.weight) == (None, 0, 1)
    assert (provider.models, provider.headers, provider.websocket) == ((), (), "auto")
    assert (provider.connect_timeout, provider.first_byte_timeout, provider.idle_timeout) == (
        10.0,
        60.0,
        300.0,
    )
    assert ClientKey(name="a", key="k").websocket is True
    assert ClientKey(name="a", key="k").limits == KeyLimitsConfig()
    assert UsageConfig() == UsageConfig(
        "sqlite:///cch-usage.sqlite3", 1.0, 10000, "cch-usage-spill.jsonl", True
    )
    assert KeyLimitsConfig() == KeyLimitsConfig(None, None, None, None, None, None, None)
    assert PriceConfig("m", 1.0, 2.0).cached_input_per_mtok is None


def test_empty_file_gives_defaults_with_file_as_source() -> None:
    config = load("")
    assert config.server == DEFAULT_SERVER and config.limits == LimitsConfig()
    assert config.source == "cch.toml"


def test_full_example_file_sets_every_key() -> None:
    config = load(FULL_EXAMPLE, {"OPENAI_API_KEY": "sk-openai"})
    assert config.server == ServerConfig(
        "tcp:9090:interface=127.0.0.1", False, 12.0, replica="eu-1"
    )
    defaults = KeyLimitsConfig(
        max_connections=8,
        max_concurrent_turns=4,
        requests_per_minute=60,
        tokens_per_minute=200000,
        tokens_per_day=5000000,
        budget_per_month=50.0,
        models=("gpt-5.5", "gpt-5.5-mini"),
    )
    assert config.key_defaults == defaults
    assert config.keys == (
        ClientKey(
            "alice",
            "sk-cch-alice-0123456789",
            websocket=False,
            limits=dataclasses.replace(defaults, requests_per_minute=10, models=("gpt-5.5",)),
        ),
        ClientKey("bob", "sk-cch-bob-0123456789", websocket=True, limits=defaults),
    )
    assert config.auth_required
    openai, backup = config.providers
    assert openai == ProviderConfig(
        name="openai",
        base_url="https://api.openai.com/v1",
        api_key="sk-openai",
        priority=0,
        weight=3,
        models=("gpt-5.5", "gpt-5.5-mini"),
        headers=(("x-team", "a"), ("OpenAI-Beta", "responses=v1")),
        websocket="on",
        connect_timeout=5.0,
        first_byte_timeout=45.5,
        idle_timeout=120.0,
    )
    assert (backup.api_key, backup.priority, backup.websocket) == ("sk-backup", -1, "auto")
    assert config.limits == LimitsConfig(1000, 2, 3000, 4.0, 5000, 6000, 7.0, 8.0)
    assert config.breaker == BreakerConfig(9, 10.0)
    assert config.tunnel == TunnelConfig(
        "http", "http://127.0.0.1:9090/v1/responses", "file-secret-0123456789abcdefghijklmn"
    )
    assert config.upstream_websocket == UpstreamWebSocketConfig(
        False, 11.0, 12.0, 13, 14.0, 15.0, 16
    )
    assert config.usage == UsageConfig(
        "postgresql://cch@db.internal:5432/cch", 0.5, 17, "/var/lib/cch/spill.jsonl", False
    )
    assert config.prices == (
        PriceConfig("gpt-5.5", 1.25, 10.0, cached_input_per_mtok=0.125),
        PriceConfig("gpt-5.5-mini", 0.25, 2.0),
    )
    assert all(isinstance(p.output_per_mtok, float) for p in config.prices)


def test_integers_are_accepted_for_durations_and_stored_as_float() -> None:
    config = load("[breaker]\ncooldown = 3\n")
    assert config.breaker.cooldown == 3.0 and isinstance(config.breaker.cooldown, float)


def test_config_is_frozen() -> None:
    config = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = ServerConfig()  # type: ignore[misc]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCH_BREAKER_COOLDOWN", "7")
    assert load_config(None).breaker.cooldown == 7.0


def test_path_like_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[breaker]\ncooldown = 2\n")
    config = load_config(tmp_path / "c.toml", {})
    assert config.breaker.cooldown == 2.0 and config.source == str(tmp_path / "c.toml")


# --- reading the file --------------------------------------------------------------------------


def test_missing_file_names_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nope.toml", {})
    assert str(info.value) == "nope.toml: cannot read file: No such file or directory"


def test_directory_instead_of_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"^dir\.toml: cannot read file: "):
        load_config("dir.toml", {})


def test_toml_syntax_error_gives_line_and_column() -> None:
    message = error('[server]\nlisten = "tcp:8080\n')
    assert message.startswith("cch.toml: invalid TOML: ")
    assert "line 2" in message and "column" in message


def test_non_utf8_file_is_refused() -> None:
    Path("cch.toml").write_bytes(b'[server]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError, match=r"^cch\.toml: not UTF-8 text"):
        load_config("cch.toml", {})


# --- shape: unknown tables and keys ------------------------------------------------------------


def test_unknown_table_names_file_and_table_and_lists_allowed() -> None:
    assert error("[sever]\nlisten = 'tcp:1'\n") == (
        "cch.toml: sever: unknown table; did you mean server? (allowed tables: breaker, "
        "cluster, continuity, key_defaults, keys, limits, prices, providers, server, tracing, "
        "tunnel, upstream_websocket, usage)"
    )


def test_unknown_top_level_key_is_refused() -> None:
    assert error('listen = "tcp:1"\n').startswith(
        "cch.toml: listen: unknown top-level key; did you mean [server] listen? (allowed tables: "
        "breaker, cluster, continuity, key_defaults,"
    )


def test_unknown_key_names_file_and_key() -> None:
    assert error("[limits]\nmax_pending_frame = 3\n") == (
        "cch.toml: limits.max_pending_frame: unknown key; did you mean max_pending_frames? "
        "(allowed: auth_failure_limit, "
        "auth_failure_window, auto_ping_interval, auto_ping_timeout, handshake_timeout, "
        "max_json_response_bytes, max_message_bytes, max_pending_bytes, max_pending_frames, "
        "max_request_body_bytes, max_upstream_event_bytes, outbound_send_timeout, websocket_compression, websocket_compression_window_bits)"
    )


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[server]\nport = 1\n", "server.port"),
        ("[breaker]\nthreshold = 1\n", "breaker.threshold"),
        ("[tunnel]\nsecretenv = 'X'\n", "tunnel.secretenv"),
        ("[upstream_websocket]\nenable = true\n", "upstream_websocket.enable"),
        (KEY + "role = 'admin'\n", "keys[0].role"),
        (PROVIDER + PROVIDER.replace('"p"', '"q"') + "apikey = 'x'\n", "providers[1].apikey"),
        ("[usage]\npath = 'x'\n", "usage.path"),
        ("[key_defaults]\nrpm = 1\n", "key_defaults.rpm"),
        (PRICE + "currency = 'EUR'\n", "prices[0].currency"),
        (KEY + "limits = { rpm = 1 }\n", "keys[0].limits"),
    ],
)
def test_unknown_key_in_any_table_is_named(text: str, path: str) -> None:
    assert error(text).startswith(f"cch.toml: {path}: unknown key")
    assert "(allowed: " in error(text)


@pytest.mark.parametrize(
    ("text", "path", "guess"),
    [
        ("[breaker]\nthreshold = 1\n", "breaker.threshold", "failure_threshold"),
        ("[usage]\ndatabse = 'off'\n", "usage.databse", "database"),
        ("[usage]\nspillfile = 1\n", "usage.spillfile", "spill_file"),
        ("[key_defaults]\nrequest_per_minute = 1\n", "key_defaults.request_per_minute", "requests_per_minute"),
        (KEY + "max_connection = 1\n", "keys[0].max_connection", "max_connections"),
        (KEY + "model = ['gpt-5']\n", "keys[0].model", "models"),
        (PRICE + "cached_per_mtok = 0.1\n", "prices[0].cached_per_mtok", "cached_input_per_mtok"),
        (PRICE + "output_per_mtoken = 1\n", "prices[0].output_per_mtoken", "output_per_mtok"),
    ],
)  # fmt: skip
def test_misspelt_key_gets_a_suggestion(text: str, path: str, guess: str) -> None:
    assert error(text).startswith(
        f"cch.toml: {path}: unknown key; did you mean {guess}? (allowed: "
    )


@pytest.mark.parametrize(
    ("table", "guess"), [("usag", "usage"), ("price", "prices"), ("key_default", "key_defaults")]
)
def test_misspelt_table_gets_a_suggestion(table: str, guess: str) -> None:
    assert error(f"[{table}]\nx = 1\n").startswith(
        f"cch.toml: {table}: unknown table; did you mean {guess}? (allowed tables: "
    )


def test_a_limit_in_a_key_lists_the_limit_fields_as_allowed() -> None:
    allowed = error(KEY + "zzz = 1\n").split("(allowed: ")[1]
    assert allowed == (
        "budget_per_month, key, key_env, max_concurrent_turns, max_connections, models, name, "
        "requests_per_minute, tokens_per_day, tokens_per_minute, websocket)"
    )


def test_unknown_provider_key_lists_api_key_env_as_allowed() -> None:
    assert "api_key_env" in error(PROVIDER + "key = 'x'\n")


def test_section_must_be_a_table() -> None:
    assert error("server = 1\n") == "cch.toml: server: must be a table, written [server]"


def test_keys_must_be_an_array_of_tables() -> None:
    assert error("[keys]\nname = 'a'\n") == (
        "cch.toml: keys: must be an array of tables, written [[keys]]"
    )


def test_prices_must_be_an_array_of_tables_and_key_defaults_a_table() -> None:
    assert error("[prices]\nmodel = 'a'\n") == (
        "cch.toml: prices: must be an array of tables, written [[prices]]"
    )
    assert error("[[key_defaults]]\nmax_connections = 1\n") == (
        "cch.toml: key_defaults: must be a table, written [key_defaults]"
    )


# --- types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[limits]\nmax_pending_frames = true", "limits.max_pending_frames: must be an integer (got boolean)"),
        ("[limits]\nmax_message_bytes = 1.5", "limits.max_message_bytes: must be an integer (got float)"),
        ("[limits]\nmax_message_bytes = '10'", "limits.max_message_bytes: must be an integer (got string)"),
        ("[server]\nwebsocket = 'yes'", "server.websocket: must be a boolean (got string)"),
        ("[server]\nwebsocket = 1", "server.websocket: must be a boolean (got integer)"),
        ("[server]\ndrain_timeout = '30'", "server.drain_timeout: must be a number (got string)"),
        ("[server]\ndrain_timeout = false", "server.drain_timeout: must be a number (got boolean)"),
        ("[server]\nlisten = 8080", "server.listen: must be a string (got integer)"),
        ("[tunnel]\nurl = 1979-05-27", "tunnel.url: must be a string (got date/time)"),
        (KEY.replace('"alice"', "['alice']"), "keys[0].name: must be a string (got array)"),
        (PROVIDER + "models = 'gpt'", "providers[0].models: must be an array of strings (got string)"),
        (PROVIDER + "models = ['a', 1]", "providers[0].models: must be an array of strings (got array with an integer item)"),
        (PROVIDER + "headers = ['a']", "providers[0].headers: must be a table of strings (got array)"),
        (PROVIDER + "headers = { x-a = 1 }", "providers[0].headers: must be a table of strings (got table with an integer value)"),
        (PROVIDER + "weight = 2.0", "providers[0].weight: must be an integer (got float)"),
        (PROVIDER + "api_key = 5", "providers[0].api_key: must be a string (got integer)"),
    ],
)  # fmt: skip
def test_wrong_type_names_key_expected_and_actual_type(text: str, expected: str) -> None:
    assert error(text + "\n") == f"cch.toml: {expected}"


def _numeric_options() -> list[tuple[str, str]]:
    return [
        (key, kind)
        for key, kind, _default, _env in config_schema()
        if kind in ("integer", "number")
        and key != "providers[].priority"
        and not key.startswith("prices[]")  # a price may be 0: test_prices_may_be_zero
    ]


def _toml_for(dotted: str, value: str) -> str:
    section, key = dotted.split(".")
    if section == "keys[]":
        return f"{KEY}{key} = {value}\n"
    if section.endswith("[]"):
        return f"{PROVIDER}{key} = {value}\n"
    return f"[{section}]\n{key} = {value}\n"


def _path_of(dotted: str) -> str:
    return dotted.replace("[]", "[0]")


@pytest.mark.parametrize(("dotted", "kind"), _numeric_options())
def test_every_number_must_be_positive(dotted: str, kind: str) -> None:
    expected = "must be >= 1 (got 0)" if kind == "integer" else "must be a number > 0 (got 0.0)"
    assert error(_toml_for(dotted, "0")) == f"cch.toml: {_path_of(dotted)}: {expected}"


@pytest.mark.parametrize("value", ["-1.5", "nan", "inf"])
def test_durations_must_be_finite_and_positive(value: str) -> None:
    assert error(f"[breaker]\ncooldown = {value}\n").startswith(
        "cch.toml: breaker.cooldown: must be a number > 0 (got "
    )


def test_one_is_the_smallest_integer_limit() -> None:
    config = load("[limits]\nmax_pending_frames = 1\n[breaker]\nfailure_threshold = 1\n")
    assert (config.limits.max_pending_frames, config.breaker.failure_threshold) == (1, 1)


def test_provider_priority_may_be_negative_or_zero() -> None:
    config = load(PROVIDER + "priority = -5\n")
    assert config.providers[0].priority == -5


def test_first_problem_wins() -> None:
    message = error("[server]\nwebsocket = 'x'\n[limits]\nmax_pending_frames = 0\n")
    assert message.startswith("cch.toml: server.websocket:")


# --- [[keys]] ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["name", "key"])
def test_key_name_and_key_are_required(missing: str) -> None:
    text = KEY.replace(f"{missing} = ", "# ")
    assert error(text) == f"cch.toml: keys[0].{missing}: is required"


def test_key_name_must_not_be_empty() -> None:
    assert error(KEY.replace('"alice"', '""')) == "cch.toml: keys[0].name: must not be empty"


def test_short_key_is_refused_without_echoing_it() -> None:
    message = error(KEY.replace("sk-cch-alice-0123456789", "sk-cch-abc12345"))
    assert message == "cch.toml: keys[0].key: must be at least 16 characters (got 15)"


def test_sixteen_character_key_is_enough() -> None:
    key = "0123456789abcdef"
    assert load(KEY.replace("sk-cch-alice-0123456789", key)).keys[0].key == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (r" sk-cch-0123456789abc", "must not start or end with whitespace"),
        (r"sk-cch-0123456789abc\t", "must not start or end with whitespace"),
        (r"sk-cch-0123456789abc\u00a0", "must not start or end with whitespace"),
        (r"sk-cch-01234\u00e96789abc", "must be printable ASCII only (character 13 is not)"),
        (r"sk-cch-01234\u00016789abc", "must be printable ASCII only (character 13 is not)"),
    ],
)
def test_key_with_surrounding_space_or_non_printable_ascii_is_refused_without_echoing_it(
    key: str, problem: str
) -> None:
    message = error(KEY.replace('"sk-cch-alice-0123456789"', f'"{key}"'))  # TOML escapes
    assert message == f"cch.toml: keys[0].key: {problem}"
    assert "0123456789abc" not in message


def test_key_from_the_environment_is_held_to_the_same_rule_naming_the_variable() -> None:
    text = '[[keys]]\nname = "alice"\nkey_env = "ALICE_KEY"\n'
    assert error(text, {"ALICE_KEY": "sk-short"}) == (
        "cch.toml: keys[0].key_env (ALICE_KEY): must be at least 16 characters (got 8)"
    )
    assert error(text, {"ALICE_KEY": "sk-cch-0123456789abc "}) == (
        "cch.toml: keys[0].key_env (ALICE_KEY): must not start or end with whitespace"
    )


def test_duplicate_key_names_are_refused() -> None:
    text = KEY + KEY.replace("sk-cch-alice-0123456789", "another-key-value")
    assert error(text) == (
        "cch.toml: keys[1].name: same name as keys[0] ('alice'); each must be unique"
    )


def test_duplicate_key_values_are_refused_without_echoing_them() -> None:
    text = KEY + KEY.replace('"alice"', '"bob"')
    message = error(text)
    assert message == "cch.toml: keys[1].key: same key as keys[0]; each must be unique"


def test_keys_turn_auth_on() -> None:
    assert load(KEY).auth_required


# --- [[providers]] ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["name", "base_url"])
def test_provider_name_and_base_url_are_required(missing: str) -> None:
    assert error(PROVIDER.replace(f"{missing} = ", "# ")) == (
        f"cch.toml: providers[0].{missing}: is required"
    )


def test_provider_name_must_not_be_empty() -> None:
    assert error(PROVIDER.replace('"p"', '""')) == "cch.toml: providers[0].name: must not be empty"


def test_duplicate_provider_names_are_refused() -> None:
    assert error(PROVIDER * 2) == (
        "cch.toml: providers[1].name: same name as providers[0] ('p'); each must be unique"
    )


@pytest.mark.parametrize(
    "url", ["ftp://x", "api.openai.com/v1", "http://", "https:///v1", "http://x:99999/v1", ""]
)
def test_provider_base_url_must_be_http_with_a_host(url: str) -> None:
    text = PROVIDER + PROVIDER.replace('"p"', '"q"').replace("https://api.example.com/v1", url)
    assert error(text) == (
        f"cch.toml: providers[1].base_url: must be an http:// or https:// URL with a host "
        f"(got {url!r})"
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/v1", "https://api.openai.com/v1", "http://[::1]:8000", "HTTPS://X"]
)
def test_provider_base_url_accepts_http_and_https(url: str) -> None:
    assert load(PROVIDER.replace("https://api.example.com/v1", url)).providers[0].base_url == url


def test_provider_weight_must_be_at_least_one() -> None:
    assert error(PROVIDER + "weight = 0\n") == "cch.toml: providers[0].weight: must be >= 1 (got 0)"


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_provider_websocket_modes(mode: str) -> None:
    assert load(PROVIDER + f"websocket = '{mode}'\n").providers[0].websocket == mode


@pytest.mark.parametrize("mode", ["true", "ON", ""])
def test_provider_websocket_must_be_auto_on_or_off(mode: str) -> None:
    assert error(PROVIDER + f"websocket = '{mode}'\n") == (
        f"cch.toml: providers[0].websocket: must be one of auto, on, off (got {mode!r})"
    )


@pytest.mark.parametrize("api", ["chat", "anthropic"])
def test_a_translated_provider_is_reached_over_http_only(api: str) -> None:
    provider = load(PROVIDER + f"api = '{api}'\n").providers[0]
    assert (provider.api, provider.translated, provider.websocket) == (api, True, "off")
    assert load(PROVIDER).providers[0].api == "responses" and not load(PROVIDER).providers[0].translated


def test_a_translated_provider_refuses_websocket_on() -> None:
    assert error(PROVIDER + "api = 'chat'\nwebsocket = 'on'\n") == (
        "cch.toml: providers[0].websocket: \"on\" needs api = \"responses\": a chat provider is "
        'reached over HTTP only (leave websocket unset or "off")'
    )


def test_provider_api_must_be_known() -> None:
    assert error(PROVIDER + "api = 'gemini'\n") == (
        "cch.toml: providers[0].api: must be one of responses, chat, anthropic (got 'gemini')"
    )


def test_model_map_renames_only_the_models_it_names() -> None:
    provider = load(PROVIDER + "model_map = { 'gpt-5.5' = 'qwen3-coder' }\n").providers[0]
    assert provider.model_map == (("gpt-5.5", "qwen3-coder"),)
    assert (provider.upstream_model("gpt-5.5"), provider.upstream_model("other")) == ("qwen3-coder", "other")
    assert error(PROVIDER + "model_map = { 'gpt-5.5' = '' }\n") == (
        "cch.toml: providers[0].model_map: model names may not be empty (got 'gpt-5.5' = '')"
    )


def test_provider_api_key_inline() -> None:
    assert load(PROVIDER + "api_key = 'sk-1'\n").providers[0].api_key == "sk-1"


def test_provider_api_key_from_named_environment_variable() -> None:
    config = load(PROVIDER + "api_key_env = 'MY_KEY'\n", {"MY_KEY": "sk-env"})
    assert config.providers[0].api_key == "sk-env"


def test_provider_without_key_has_none() -> None:
    assert load(PROVIDER).providers[0].api_key is None


@pytest.mark.parametrize("env", [{}, {"MY_KEY": ""}])
def test_missing_provider_secret_names_the_variable(env: dict[str, str]) -> None:
    assert error(PROVIDER + "api_key_env = 'MY_KEY'\n", env) == (
        "cch.toml: providers[0].api_key_env: environment variable MY_KEY is not set"
    )


def test_api_key_and_api_key_env_together_are_refused() -> None:
    text = PROVIDER + "api_key = 'sk-1'\napi_key_env = 'MY_KEY'\n"
    assert error(text, {"MY_KEY": "sk-2"}) == (
        "cch.toml: providers[0].api_key_env: set either api_key or api_key_env, not both"
    )


@pytest.mark.parametrize("key", ["api_key", "api_key_env"])
def test_empty_api_key_settings_are_refused(key: str) -> None:
    assert error(PROVIDER + f"{key} = ''\n") == f"cch.toml: providers[0].{key}: must not be empty"


def test_provider_headers_and_models_become_tuples() -> None:
    config = load(PROVIDER + "models = ['a', 'b']\nheaders = { 'x-team' = 'a', X-Other = 'b' }\n")
    assert config.providers[0].models == ("a", "b")
    assert config.providers[0].headers == (("x-team", "a"), ("X-Other", "b"))


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "Authorization",
        "HOST",
        "content-length",
        "Connection",
        "transfer-encoding",
        "x-cch-internal-secret",
        "X-CCH-Anything",
    ],
)
def test_provider_headers_may_not_set_gateway_owned_names(name: str) -> None:
    message = error(PROVIDER + f"headers = {{ '{name}' = 'v' }}\n")
    assert message.startswith(f"cch.toml: providers[0].headers: {name!r} may not be set here")
    assert "api_key" in message


def test_provider_header_name_must_be_a_token() -> None:
    assert error(PROVIDER + "headers = { 'bad name' = 'v' }\n") == (
        "cch.toml: providers[0].headers: 'bad name' is not a valid header name"
    )


def test_provider_header_value_may_not_contain_line_breaks() -> None:
    assert error(PROVIDER + 'headers = { x-a = "v\\r\\nInjected: 1" }\n') == (
        "cch.toml: providers[0].headers: the value of 'x-a' contains a line break or NUL"
    )


def test_provider_forward_headers_are_stored_lower_case() -> None:
    config = load(
        PROVIDER
        + "forward_headers = ['OpenAI-Organization', 'openai-project', 'X-Forwarded-For']\n"
    )
    assert config.providers[0].forward_headers == (
        "openai-organization",
        "openai-project",
        "x-forwarded-for",
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Authorization", "it carries the client's credentials (the provider gets api_key instead)"),
        ("x-api-key", "it carries the client's credentials (the provider gets api_key instead)"),
        ("Cookie", "it carries the client's credentials (the provider gets api_key instead)"),
        ("Host", "the gateway sets it for each hop (the Host and the message's framing)"),
        ("content-length", "the gateway sets it for each hop (the Host and the message's framing)"),
        ("transfer-encoding", "the gateway sets it for each hop (the Host and the message's framing)"),
        ("Connection", "it is hop-by-hop (RFC 9110 §7.6.1)"),
        ("keep-alive", "it is hop-by-hop (RFC 9110 §7.6.1)"),
        ("sec-websocket-key", "it belongs to the WebSocket handshake"),
        ("accept", "the gateway sets it for each upstream request"),
        ("x-cch-internal-secret", "x-cch-* headers are the gateway's own"),
        ("X-CCH-Tenant", "x-cch-* headers are the gateway's own"),
    ],
)  # fmt: skip
def test_provider_forward_headers_may_never_name_credentials_framing_or_gateway_headers(
    name: str, reason: str
) -> None:
    assert error(PROVIDER + f"forward_headers = ['{name}']\n") == (
        f"cch.toml: providers[0].forward_headers: {name!r} is never forwarded: {reason}"
    )


@pytest.mark.parametrize("name", ["bad name", "", "x-a:", "caf\u00e9"])
def test_provider_forward_header_must_be_a_header_name(name: str) -> None:
    assert error(PROVIDER + f'forward_headers = ["{name}"]\n') == (
        f"cch.toml: providers[0].forward_headers: {name!r} is not a valid header name"
    )


def test_no_providers_is_allowed() -> None:
    assert load("").providers == ()


# --- [tunnel] ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["in-process", "http"])
def test_tunnel_modes(mode: str) -> None:
    assert load(f"[tunnel]\nmode = '{mode}'\n").tunnel.mode == mode


def test_tunnel_mode_must_be_known() -> None:
    assert error("[tunnel]\nmode = 'loopback'\n") == (
        "cch.toml: tunnel.mode: must be one of in-process, http (got 'loopback')"
    )


def test_tunnel_url_must_be_http() -> None:
    assert error("[tunnel]\nurl = 'ws://127.0.0.1/v1/responses'\n") == (
        "cch.toml: tunnel.url: must be an http:// or https:// URL with a host "
        "(got 'ws://127.0.0.1/v1/responses')"
    )


def test_tunnel_url_defaults_to_none_meaning_own_listener() -> None:
    assert load("[tunnel]\nmode = 'http'\n").tunnel.url is None


# Secrets of 32+ characters, one per place a secret can come from.
FILE_SECRET = "from-file-0123456789abcdefghijklmnop"
VAR_SECRET = "from-var-0123456789abcdefghijklmnopq"
GLOBAL_SECRET = "global-0123456789abcdefghijklmnopqrs"
OVERRIDE_SECRET = "override-0123456789abcdefghijklmnopq"
SECRET_FILE = f"[tunnel]\nsecret = '{FILE_SECRET}'\nsecret_env = 'MY_SECRET'\n"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (SECRET_FILE, {"MY_SECRET": VAR_SECRET, "CCH_RESPONSES_WS_INTERNAL_SECRET": GLOBAL_SECRET}, FILE_SECRET),
        ("[tunnel]\nsecret_env = 'MY_SECRET'\n", {"MY_SECRET": VAR_SECRET, "CCH_RESPONSES_WS_INTERNAL_SECRET": GLOBAL_SECRET}, VAR_SECRET),
        ("[tunnel]\nsecret = ''\nsecret_env = 'MY_SECRET'\n", {"MY_SECRET": VAR_SECRET}, VAR_SECRET),
        ("", {"CCH_RESPONSES_WS_INTERNAL_SECRET": GLOBAL_SECRET}, GLOBAL_SECRET),
        ("", {"CCH_TUNNEL_SECRET": OVERRIDE_SECRET, "CCH_RESPONSES_WS_INTERNAL_SECRET": GLOBAL_SECRET}, OVERRIDE_SECRET),
    ],
)  # fmt: skip
def test_secret_resolution_order(text: str, env: dict[str, str], expected: str) -> None:
    assert load(text, env).tunnel.secret == expected


def test_secret_defaults_to_a_fresh_uuid4_per_load() -> None:
    first, second = load("").tunnel.secret, load("").tunnel.secret
    assert uuid.UUID(first).version == 4 and first != second


def test_empty_global_secret_variable_falls_back_to_a_fresh_secret() -> None:
    secret = load("", {"CCH_RESPONSES_WS_INTERNAL_SECRET": ""}).tunnel.secret
    assert uuid.UUID(secret).version == 4


@pytest.mark.parametrize("env", [{}, {"MY_SECRET": ""}])
def test_named_secret_variable_must_be_set(env: dict[str, str]) -> None:
    assert error("[tunnel]\nsecret_env = 'MY_SECRET'\n", env) == (
        "cch.toml: tunnel.secret_env: environment variable MY_SECRET is not set"
    )


SECRET_RULE = "must be at least 32 characters (got 12); make one with python3 -c"


@pytest.mark.parametrize(
    ("text", "env", "where"),
    [
        ("[tunnel]\nsecret = 'short-secret'\n", {}, "cch.toml: tunnel.secret:"),
        ("", {"CCH_TUNNEL_SECRET": "short-secret"}, "environment: CCH_TUNNEL_SECRET:"),
        ("[tunnel]\nsecret_env = 'MY_SECRET'\n", {"MY_SECRET": "short-secret"}, "cch.toml: tunnel.secret_env: the secret in MY_SECRET"),
        ("", {"CCH_RESPONSES_WS_INTERNAL_SECRET": "short-secret"}, "environment: CCH_RESPONSES_WS_INTERNAL_SECRET:"),
    ],
)  # fmt: skip
def test_tunnel_secret_shorter_than_32_characters_is_refused_wherever_it_comes_from_without_echoing_it(
    text: str, env: dict[str, str], where: str
) -> None:
    message = error(text, env)
    assert message.startswith(f"{where} {SECRET_RULE}")
    assert "short-secret" not in message


def test_tunnel_secret_of_32_characters_is_enough() -> None:
    assert load("[tunnel]\nsecret = '" + "s" * 32 + "'\n").tunnel.secret == "s" * 32


def test_a_short_fallback_secret_is_not_looked_at_when_tunnel_secret_is_set() -> None:
    env = {"CCH_RESPONSES_WS_INTERNAL_SECRET": "short-secret"}
    assert load(f"[tunnel]\nsecret = '{FILE_SECRET}'\n", env).tunnel.secret == FILE_SECRET


@pytest.mark.parametrize(
    "url",
    [
        "https://gateway.internal/v1/responses",
        "http://127.0.0.1:8080/v1/responses",
        "http://127.8.9.10/v1/responses",
        "http://[::1]:8080/v1/responses",
        "http://localhost:8080/v1/responses",
        "http://LOCALHOST/v1/responses",
    ],
)
def test_tunnel_url_is_https_or_http_to_a_loopback_host(url: str) -> None:
    assert load(f"[tunnel]\nmode = 'http'\nurl = '{url}'\n").tunnel.url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://10.0.0.2:8080/v1/responses", "http://10.0.0.2:8080/v1/responses"),
        ("http://gateway.internal/v1/responses", "http://gateway.internal/v1/responses"),
        ("http://localhost.example.com/v1/responses", "http://localhost.example.com/v1/responses"),
        ("http://user:pa55@10.0.0.2/v1/responses", "http://***@10.0.0.2/v1/responses"),
    ],
)
def test_plain_http_tunnel_url_to_a_remote_host_is_refused(url: str, shown: str) -> None:
    message = error(f"[tunnel]\nmode = 'http'\nurl = '{url}'\n")
    assert message == (
        "cch.toml: tunnel.url: must be an https:// URL, since every turn carries the internal "
        "secret; http:// only to a loopback host (127.0.0.0/8, ::1, localhost) "
        f"(got {shown!r})"
    )
    assert "pa55" not in message


@pytest.mark.parametrize(
    "listen", ["unix:/run/cch.sock", "ssl:8443:privateKey=k.pem:interface=127.0.0.1"]
)
def test_http_tunnel_without_url_needs_a_tcp_listener(listen: str) -> None:
    message = error("[tunnel]\nmode = 'http'\n", listen=listen)
    assert message == (
        'cch.toml: tunnel.mode: "http" without tunnel.url POSTs turns over plain http:// to '
        "this gateway's own listener, which must then be tcp: or tcp6: (server.listen is "
        f'{listen!r}); set tunnel.url, or use tunnel.mode = "in-process"'
    )


def test_http_tunnel_refusal_names_the_variable_that_chose_the_mode() -> None:
    message = env_error({"CCH_TUNNEL_MODE": "http", "CCH_SERVER_LISTEN": "unix:/run/cch.sock"})
    assert message.startswith('environment: CCH_TUNNEL_MODE: "http" without tunnel.url')


@pytest.mark.parametrize("listen", ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1"])
def test_http_tunnel_without_url_accepts_a_tcp_listener(listen: str) -> None:
    assert load("[tunnel]\nmode = 'http'\n", listen=listen).tunnel.url is None


def test_http_tunnel_with_url_accepts_any_listener() -> None:
    text = "[tunnel]\nmode = 'http'\nurl = 'https://gateway.internal/v1/responses'\n"
    assert load(text, listen="unix:/run/cch.sock").tunnel.mode == "http"


# --- server.listen ----------------------------------------------------------------------------

VALID_LISTEN = [
    "tcp:0:interface=127.0.0.1",
    "tcp:8080:127.0.0.1",
    "tcp:port=65535:interface=localhost:backlog=10",
    "tcp6:8080:interface=\\:\\:1",
    "unix:/tmp/cch.sock",
    "unix:address=/tmp/cch.sock:mode=600",
]


@pytest.mark.parametrize("listen", VALID_LISTEN)
def test_loopback_listen_endpoints_are_accepted(listen: str) -> None:
    assert load_config(None, {}, listen=listen).server.listen == listen


def test_ssl_listen_endpoint_is_accepted() -> None:
    listen = "ssl:8443:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"
    assert load_config(None, {}, listen=listen).server.listen == listen


@pytest.mark.parametrize("listen", VALID_LISTEN)
def test_accepted_listen_endpoints_parse_in_twisted(listen: str) -> None:
    serverFromString(MemoryReactor(), listen)


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("", "not a Twisted server endpoint: it must start with the endpoint's type"),
        (
            "udp:53",
            "not a Twisted server endpoint: unknown type 'udp' (tcp, tcp6, ssl, unix, systemd",
        ),
        ("TCP:8080", "not a Twisted server endpoint: unknown type 'TCP'"),
        (
            "systemd:domain=INET",
            "not a Twisted server endpoint: Specify exactly one of descriptor index or name",
        ),
        (
            "systemd:domain=INET:index=0",
            "not a Twisted server endpoint: no such socket was handed over by systemd",
        ),
        ("tcp", "tcp endpoint needs a port 0..65535"),
        ("tcp:", "tcp endpoint needs a port 0..65535"),
        ("tcp:http", "tcp endpoint needs a port 0..65535"),
        ("tcp:-1", "tcp endpoint needs a port 0..65535"),
        ("tcp:65536", "tcp endpoint needs a port 0..65535"),
        ("ssl:interface=127.0.0.1", "ssl endpoint needs a port 0..65535"),
        (
            "tcp:8080:interface=::1",
            "not a Twisted server endpoint: interface is given twice (write",
        ),
        ("tcp:8080:127.0.0.1:50:x", "not a Twisted server endpoint: too many ':'-separated parts"),
        ("tcp:8080:port=9", "not a Twisted server endpoint: port is given twice"),
        ("tcp:8080:host=127.0.0.1", "not a Twisted server endpoint: unknown tcp parameter 'host'"),
        ("tcp:8080:interface=127.0.0.1:backlog=many", "backlog must be a whole number"),
        ("tcp:8080\\", "not a Twisted server endpoint: it ends with a lone '\\'"),
        ("unix:", "a unix endpoint needs a path"),
    ],
)
def test_bad_listen_endpoint_is_refused(listen: str, problem: str) -> None:
    message = error(f"[server]\nlisten = '{listen}'\n")
    assert message.startswith(f"cch.toml: server.listen: {problem}")
    assert repr(listen) in message


@pytest.mark.parametrize(
    "listen", ["udp:53", "tcp:http", "tcp:8080:interface=::1", "tcp:8080:127.0.0.1:50:x"]
)
def test_refused_listen_endpoints_fail_in_twisted_too(listen: str) -> None:
    with pytest.raises((ValueError, TypeError, KeyError)):
        serverFromString(MemoryReactor(), listen)


@pytest.mark.parametrize(
    "listen", ["tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp6:8080", "tcp:8080:interface=10.1.2.3"]
)
def test_public_listen_without_keys_is_refused(listen: str) -> None:
    message = error(f"[server]\nlisten = '{listen}'\n")
    assert message.startswith(f"cch.toml: server.listen: binding {listen!r} (not loopback only)")
    assert "[[keys]]" in message and "tcp:8080:interface=127.0.0.1" in message


def test_public_listen_with_keys_is_allowed() -> None:
    config = load(KEY + "[server]\nlisten = 'tcp:8080'\n")
    assert config.server.listen == "tcp:8080" and config.auth_required


def test_public_listen_refusal_from_command_line_names_the_option() -> None:
    assert error("", listen="tcp:9000").startswith(
        "command line: --listen: binding 'tcp:9000' (not loopback only) without [[keys]] is refused"
    )


def test_public_listen_refusal_from_environment_names_the_variable() -> None:
    assert env_error({"CCH_SERVER_LISTEN": "tcp:9000"}).startswith(
        "environment: CCH_SERVER_LISTEN: binding 'tcp:9000'"
    )


@pytest.mark.parametrize(
    ("description", "loopback"),
    [
        ("tcp:8080:interface=127.0.0.1", True),
        ("tcp:8080:interface=127.9.8.7", True),
        ("tcp:8080:127.0.0.1", True),
        ("tcp:8080:interface=localhost", True),
        ("tcp:8080:interface=LOCALHOST", True),
        ("tcp6:8080:interface=\\:\\:1", True),
        ("tcp6:8080:50:\\:\\:1", True),
        ("tcp6:8080:interface=\\:\\:ffff\\:127.0.0.1", True),
        ("ssl:8443:privateKey=k.pem:interface=127.0.0.1", True),
        ("unix:/run/cch.sock", True),
        ("tcp:8080", False),
        ("tcp:8080:interface=0.0.0.0", False),
        ("tcp6:8080", False),
        ("tcp6:8080:interface=\\:\\:", False),
        ("tcp:8080:interface=192.168.1.5", False),
        ("tcp:8080:interface=example.com", False),
        ("ssl:8443", False),
        ("tcp:8080:interface=::1", False),  # unescaped colons: Twisted would refuse it
        ("nonsense", False),
    ],
)
def test_is_loopback_endpoint(description: str, loopback: bool) -> None:
    assert is_loopback_endpoint(description) is loopback


# --- server.admin_token and server.metrics_listen ---------------------------------------------

ADMIN_TOKEN = "admin-token-0123456789"


def test_short_admin_token_is_refused_like_a_client_key_without_echoing_it() -> None:
    assert error("[server]\nadmin_token = 'admin-123'\n") == (
        "cch.toml: server.admin_token: must be at least 16 characters (got 9)"
    )
    assert env_error({"CCH_SERVER_ADMIN_TOKEN": ADMIN_TOKEN + "\n"}) == (
        "environment: CCH_SERVER_ADMIN_TOKEN: must not start or end with whitespace"
    )


def test_admin_token_of_sixteen_printable_characters_is_accepted() -> None:
    config = load(f"[server]\nadmin_token = '{ADMIN_TOKEN}'\n")
    assert config.server.admin_token == ADMIN_TOKEN


@pytest.mark.parametrize("metrics_listen", ["tcp:9100", "tcp:9100:interface=0.0.0.0", "tcp6:9100"])
def test_metrics_listen_beyond_loopback_needs_the_admin_token(metrics_listen: str) -> None:
    assert error(f"[server]\nmetrics_listen = '{metrics_listen}'\n") == (
        f"cch.toml: server.metrics_listen: {metrics_listen!r} is not loopback only, which needs "
        "server.admin_token set; or bind loopback only, e.g. tcp:9100:interface=127.0.0.1"
    )


def test_metrics_listen_refusal_from_environment_names_the_variable() -> None:
    assert env_error({"CCH_SERVER_METRICS_LISTEN": "tcp:9100"}).startswith(
        "environment: CCH_SERVER_METRICS_LISTEN: 'tcp:9100' is not loopback only"
    )


@pytest.mark.parametrize(
    ("metrics_listen", "token"),
    [
        ("tcp:9100", ADMIN_TOKEN),
        ("tcp:9100:interface=127.0.0.1", None),
        ("unix:/run/cch-metrics.sock", None),
    ],
)
def test_metrics_listen_on_loopback_or_with_an_admin_token_is_accepted(
    metrics_listen: str, token: str | None
) -> None:
    text = f"[server]\nmetrics_listen = '{metrics_listen}'\n"
    if token:
        text += f"admin_token = '{token}'\n"
    assert load(text).server.metrics_listen == metrics_listen


# --- URLs with credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://user:hunter2@x/v1", "ftp://***@x/v1"),
        ("https://user:hunter2@x:99999/v1", "https://***@x:99999/v1"),
        ("user:hunter2@x/v1", "***@x/v1"),
        ("https://user:hun/ter@2@x:0x/v1", "https://***@x:0x/v1"),
    ],
)
def test_invalid_base_url_is_shown_without_its_user_and_password(url: str, shown: str) -> None:
    message = error(PROVIDER.replace("https://api.example.com/v1", url))
    assert message == (
        f"cch.toml: providers[0].base_url: must be an http:// or https:// URL with a host "
        f"(got {shown!r})"
    )
    assert "hunter2" not in message and "hun" not in message


def test_invalid_tunnel_url_is_shown_without_its_user_and_password() -> None:
    message = error("[tunnel]\nurl = 'ws://me:hunter2@127.0.0.1/v1/responses'\n")
    assert message.endswith("(got 'ws://***@127.0.0.1/v1/responses')")


# --- server.allowed_origins, allowed_hosts, trusted_proxies -----------------------------------


def test_allowed_origins_as_browsers_send_them_are_kept() -> None:
    origins = ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"]
    config = load(f"[server]\nallowed_origins = {origins!r}\n")
    assert config.server.allowed_origins == tuple(origins)


def test_allowed_origins_star_is_refused_asking_for_a_list() -> None:
    assert error("[server]\nallowed_origins = ['*']\n") == (
        "cch.toml: server.allowed_origins: '*' is not accepted: list the browser origins one by "
        "one, e.g. 'https://app.example.com'"
    )


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://app.example.com/", "https://app.example.com"),
        ("https://app.example.com/path", "https://app.example.com"),
        ("https://app.example.com?x=1", "https://app.example.com"),
        ("HTTPS://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://app.example.com:8080/", "http://app.example.com:8080"),
        ("https://user:hunter2@app.example.com", "https://app.example.com"),
        ("https://b\u00fccher.example", "https://xn--bcher-kva.example"),
    ],
)
def test_allowed_origin_not_in_the_form_browsers_send_is_refused_showing_that_form(
    origin: str, expected: str
) -> None:
    message = error(f'[server]\nallowed_origins = ["{origin}"]\n')
    shown = origin.replace("user:hunter2@", "***@")
    assert message == (
        f"cch.toml: server.allowed_origins: {shown!r} is not an origin as browsers send it: "
        f"write {expected!r} (scheme://host[:port] in lower case; no path, query, trailing "
        "slash or default port)"
    )


@pytest.mark.parametrize(
    "origin", ["null", "app.example.com", "ftp://app.example.com", "https://", "http://[::1"]
)
def test_allowed_origin_that_is_no_http_origin_is_refused(origin: str) -> None:
    assert error(f"[server]\nallowed_origins = ['{origin}']\n") == (
        f"cch.toml: server.allowed_origins: {origin!r} is not an origin: write "
        "scheme://host[:port] with scheme http or https, e.g. 'https://app.example.com'"
    )


def test_allowed_hosts_are_stored_as_a_host_header_compares_them() -> None:
    hosts = [
        "gateway.internal",
        "Gateway.Example.com.",
        "10.0.0.5",
        "::1",
        "[2001:DB8::5]",
        "my_service",
    ]
    config = load(f"[server]\nallowed_hosts = {hosts!r}\n")
    assert config.server.allowed_hosts == (
        "gateway.internal",
        "gateway.example.com",
        "10.0.0.5",
        "::1",
        "2001:db8::5",
        "my_service",
    )


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("gateway.internal:8080", "write the host name or IP address without a port (any port works)"),
        ("[::1]:8080", "write the host name or IP address without a port (any port works)"),
        ("http://gateway.internal", "write the host name or IP address alone, without scheme or path"),
        ("gateway.internal/v1", "write the host name or IP address alone, without scheme or path"),
        ("*.example.com", "wildcards are not supported; list each host name"),
        ("*", "wildcards are not supported; list each host name"),
    ],
)  # fmt: skip
def test_allowed_host_with_port_scheme_path_or_wildcard_is_refused(host: str, problem: str) -> None:
    assert error(f"[server]\nallowed_hosts = ['{host}']\n") == (
        f"cch.toml: server.allowed_hosts: {host!r}: {problem}"
    )


@pytest.mark.parametrize("host", ["", "-gateway", "gate way", "a..b", "x" * 64 + ".example"])
def test_allowed_host_that_is_no_host_name_is_refused(host: str) -> None:
    assert error(f"[server]\nallowed_hosts = ['{host}']\n") == (
        f"cch.toml: server.allowed_hosts: {host!r} is not a host name or IP address"
    )


def test_trusted_proxies_are_addresses_or_networks_and_need_no_keys() -> None:
    proxies = ["10.0.0.0/8", "192.0.2.7", "10.1.2.3/16", "2001:db8::/32", "::1"]
    config = load(f"[server]\ntrusted_proxies = {proxies!r}\n")
    assert config.server.trusted_proxies == tuple(proxies) and not config.auth_required


@pytest.mark.parametrize("proxy", ["proxy.internal", "10.0.0.0/33", "10.0.0.1:80", ""])
def test_trusted_proxy_that_is_no_address_or_network_is_refused(proxy: str) -> None:
    assert error(f"[server]\ntrusted_proxies = ['10.0.0.1', '{proxy}']\n") == (
        f"cch.toml: server.trusted_proxies: {proxy!r} is not an IP address or CIDR network "
        "(e.g. '10.0.0.0/8', '192.0.2.7', '2001:db8::/32')"
    )


# --- [usage] ----------------------------------------------------------------------------------

DATABASE_FORMS = (
    '"off", "sqlite:///cch-usage.sqlite3" (relative to the run directory; '
    '"sqlite:////var/lib/cch/usage.sqlite3" for an absolute path) or '
    '"postgresql://user@host:5432/db"'
)


@pytest.mark.parametrize(
    "database",
    [
        "sqlite:///cch-usage.sqlite3",
        "sqlite:///data/usage.db",
        "sqlite:////var/lib/cch/usage.sqlite3",
        "postgresql://cch@127.0.0.1:5432/test",
        "postgresql://cch:s3cret@db.internal/cch?sslmode=require",
        "postgresql://db.internal/cch",  # user and password from PGUSER / PGPASSWORD / ~/.pgpass
        "postgresql:///cch",  # the local socket
        "postgresql://",  # everything from the PG* environment
    ],
)
def test_usage_database_accepts_sqlite_and_postgresql_urls(database: str) -> None:
    usage = load(f"[usage]\ndatabase = '{database}'\n").usage
    assert usage.database == database and usage.enabled


def test_usage_database_off_disables_the_ledger() -> None:
    assert not load("[usage]\ndatabase = 'off'\n").usage.enabled


def test_usage_database_postgres_scheme_is_stored_as_postgresql() -> None:
    usage = load("[usage]\ndatabase = 'postgres://cch@db/cch'\n").usage
    assert usage.database == "postgresql://cch@db/cch"


@pytest.mark.parametrize("database", ["sqlite://cch.db", "sqlite:///", "sqlite:cch.db", "sqlite:"])
def test_usage_sqlite_database_needs_three_slashes_and_a_path(database: str) -> None:
    assert error(f"[usage]\ndatabase = '{database}'\n") == (
        "cch.toml: usage.database: a SQLite database is sqlite:/// and a file path, e.g. "
        f"{DATABASE_FORMS} (got {database!r})"
    )


@pytest.mark.parametrize(
    ("database", "shown"),
    [
        ("OFF", "OFF"),
        ("", ""),
        ("cch-usage.sqlite3", "cch-usage.sqlite3"),
        ("mysql://cch:hunter2@db/cch", "mysql://***@db/cch"),
        ("postgresql+psycopg://cch:hunter2@db/cch", "postgresql+psycopg://***@db/cch"),
    ],
)
def test_usage_database_of_another_kind_is_refused_without_its_password(
    database: str, shown: str
) -> None:
    message = error(f"[usage]\ndatabase = '{database}'\n")
    assert message == f"cch.toml: usage.database: must be {DATABASE_FORMS} (got {shown!r})"
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("database", "shown"),
    [
        ("postgresql://cch:hun/ter2@db/cch", "postgresql://***@db/cch"),
        ("postgresql://cch@db:port/cch", "postgresql://***@db:port/cch"),
        ("postgresql://db:99999/cch", "postgresql://db:99999/cch"),
    ],
)
def test_usage_postgresql_url_that_does_not_parse_is_refused_without_its_password(
    database: str, shown: str
) -> None:
    message = error(f"[usage]\ndatabase = '{database}'\n")
    assert message == (
        f"cch.toml: usage.database: not a valid PostgreSQL URL (got {shown!r}); percent-encode "
        "':', '/' and '@' in a password, or leave it out and set PGPASSWORD or ~/.pgpass"
    )
    assert "ter2" not in message


def test_usage_database_from_the_environment_is_checked_naming_the_variable() -> None:
    message = env_error({"CCH_USAGE_DATABASE": "mysql://cch:hunter2@db/cch"})
    assert message == (
        f"environment: CCH_USAGE_DATABASE: must be {DATABASE_FORMS} (got 'mysql://***@db/cch')"
    )


def test_usage_spill_file_must_not_be_empty() -> None:
    assert error("[usage]\nspill_file = ''\n") == "cch.toml: usage.spill_file: must not be empty"


def test_usage_admin_report_must_be_a_boolean() -> None:
    assert error("[usage]\nadmin_report = 'yes'\n") == (
        "cch.toml: usage.admin_report: must be a boolean (got string)"
    )


def test_misspelt_usage_variable_is_refused_with_a_suggestion() -> None:
    assert env_error({"CCH_USAGE_DATABSE": "off"}).startswith(
        "environment: CCH_USAGE_DATABSE: not a cch setting; did you mean CCH_USAGE_DATABASE? "
        "(known: CCH_USAGE_ADMIN_REPORT, CCH_USAGE_DATABASE, "
    )


# --- server.replica ----------------------------------------------------------------------------


def test_replica_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-7")
    assert load("").server.replica == "gateway-7"
    assert load("[server]\nreplica = ''\n").server.replica == "gateway-7"


def test_replica_named_in_the_file_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-7")
    assert load("[server]\nreplica = 'eu-1'\n").server.replica == "eu-1"


# --- [[prices]] --------------------------------------------------------------------------------


def test_prices_are_read_in_order_as_floats() -> None:
    text = PRICE + "cached_input_per_mtok = 0\n" + PRICE.replace("gpt-5", "o3").replace("1.25", "2")
    assert load(text).prices == (
        PriceConfig("gpt-5", 1.25, 10.0, cached_input_per_mtok=0.0),
        PriceConfig("o3", 2.0, 10.0, cached_input_per_mtok=None),
    )
    assert isinstance(load(text).prices[1].input_per_mtok, float)


@pytest.mark.parametrize("missing", ["model", "input_per_mtok", "output_per_mtok"])
def test_price_model_input_and_output_are_required(missing: str) -> None:
    text = "\n".join(line for line in PRICE.splitlines() if not line.startswith(missing))
    assert error(text + "\n") == f"cch.toml: prices[0].{missing}: is required"


def test_price_model_must_not_be_empty() -> None:
    assert error(PRICE.replace('"gpt-5"', '""')) == "cch.toml: prices[0].model: must not be empty"


@pytest.mark.parametrize("key", ["input_per_mtok", "cached_input_per_mtok", "output_per_mtok"])
def test_prices_may_be_zero(key: str) -> None:
    text = "[[prices]]\nmodel = 'local'\ninput_per_mtok = 1\noutput_per_mtok = 1\n"
    text = text.replace(f"{key} = 1\n", "") + f"{key} = 0\n"
    assert getattr(load(text).prices[0], key) == 0.0


@pytest.mark.parametrize("key", ["input_per_mtok", "cached_input_per_mtok", "output_per_mtok"])
@pytest.mark.parametrize(
    ("value", "shown"), [("-0.5", "-0.5"), ("-1", "-1.0"), ("nan", "nan"), ("inf", "inf")]
)
def test_negative_or_non_finite_price_is_refused(key: str, value: str, shown: str) -> None:
    text = "[[prices]]\nmodel = 'm'\ninput_per_mtok = 1\noutput_per_mtok = 1\n"
    text = text.replace(f"{key} = 1\n", "") + f"{key} = {value}\n"
    assert error(text) == f"cch.toml: prices[0].{key}: must be a number >= 0 (got {shown})"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("model = 5", "prices[0].model: must be a string (got integer)"),
        ("input_per_mtok = '1.25'", "prices[0].input_per_mtok: must be a number (got string)"),
        ("output_per_mtok = true", "prices[0].output_per_mtok: must be a number (got boolean)"),
    ],
)
def test_price_of_the_wrong_type_is_refused(line: str, expected: str) -> None:
    key = line.split(" = ")[0]
    text = "\n".join(row for row in PRICE.splitlines() if not row.startswith(key))
    assert error(f"{text}\n{line}\n") == f"cch.toml: {expected}"


def test_duplicate_price_models_are_refused() -> None:
    text = PRICE + PRICE.replace("gpt-5", "o3") + PRICE
    assert error(text) == (
        "cch.toml: prices[2].model: same model as prices[0] ('gpt-5'); each must be unique"
    )


# --- [key_defaults] and per-key limits --------------------------------------------------------

ALICE = '[[keys]]\nname = "alice"\nkey = "sk-cch-alice-0123456789"\n'
BOB = '[[keys]]\nname = "bob"\nkey = "sk-cch-bob-0123456789"\n'
NEEDS_PRICES = (
    "needs [[prices]] to count spend in USD; add a [[prices]] table (model, input_per_mtok, "
    "output_per_mtok) for each model the key uses, or remove budget_per_month"
)


def test_without_key_defaults_a_key_has_only_its_own_limits() -> None:
    (alice, bob) = load(ALICE + "requests_per_minute = 10\n" + BOB).keys
    assert alice.limits == KeyLimitsConfig(requests_per_minute=10)
    assert bob.limits == KeyLimitsConfig()


def test_key_defaults_apply_to_every_key_field_by_field_and_the_keys_own_value_wins() -> None:
    text = (
        "[key_defaults]\nmax_connections = 8\nrequests_per_minute = 60\n"
        "models = ['gpt-5', 'gpt-5-codex']\nbudget_per_month = 50\n"
        + PRICE
        + ALICE
        + "requests_per_minute = 10\nmodels = ['gpt-5']\ntokens_per_day = 1000\n"
        + BOB
    )
    config = load(text)
    defaults = KeyLimitsConfig(
        max_connections=8,
        requests_per_minute=60,
        budget_per_month=50.0,
        models=("gpt-5", "gpt-5-codex"),
    )
    assert config.key_defaults == defaults
    alice, bob = config.keys
    assert alice.limits == KeyLimitsConfig(
        max_connections=8,
        requests_per_minute=10,
        tokens_per_day=1000,
        budget_per_month=50.0,
        models=("gpt-5",),  # replaces the default list, is not added to it
    )
    assert bob.limits == defaults


def test_key_limits_are_read_with_a_key_from_the_environment() -> None:
    text = '[[keys]]\nname = "alice"\nkey_env = "ALICE_KEY"\nmax_concurrent_turns = 2\n'
    (alice,) = load(text, {"ALICE_KEY": "sk-cch-alice-0123456789"}).keys
    assert alice.limits == KeyLimitsConfig(max_concurrent_turns=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[key_defaults]\nmax_connections = -3\n", "key_defaults.max_connections: must be >= 1 (got -3)"),
        (ALICE + "requests_per_minute = 0\n", "keys[0].requests_per_minute: must be >= 1 (got 0)"),
        (ALICE + "tokens_per_minute = 1.5\n", "keys[0].tokens_per_minute: must be an integer (got float)"),
        (ALICE + "tokens_per_day = true\n", "keys[0].tokens_per_day: must be an integer (got boolean)"),
        (ALICE + "max_concurrent_turns = '2'\n", "keys[0].max_concurrent_turns: must be an integer (got string)"),
        (PRICE + ALICE + "budget_per_month = 0\n", "keys[0].budget_per_month: must be a number > 0 (got 0.0)"),
        (PRICE + ALICE + "budget_per_month = -5\n", "keys[0].budget_per_month: must be a number > 0 (got -5.0)"),
        (PRICE + ALICE + "budget_per_month = nan\n", "keys[0].budget_per_month: must be a number > 0 (got nan)"),
        (PRICE + ALICE + "budget_per_month = '5'\n", "keys[0].budget_per_month: must be a number (got string)"),
        ("[key_defaults]\nmodels = []\n", "key_defaults.models: must list at least one model (leave it out to allow every model)"),
        (ALICE + "models = []\n", "keys[0].models: must list at least one model (leave it out to allow every model)"),
        (ALICE + "models = ['gpt-5', '']\n", "keys[0].models: must not hold an empty model name"),
        (ALICE + "models = [' ']\n", "keys[0].models: must not hold an empty model name"),
        (ALICE + "models = 'gpt-5'\n", "keys[0].models: must be an array of strings (got string)"),
        (ALICE + "models = ['gpt-5', 5]\n", "keys[0].models: must be an array of strings (got array with an integer item)"),
    ],
)  # fmt: skip
def test_bad_limit_is_refused_naming_the_table_and_key(text: str, expected: str) -> None:
    assert error(text) == f"cch.toml: {expected}"


def test_budget_in_key_defaults_without_prices_is_refused() -> None:
    assert error("[key_defaults]\nbudget_per_month = 50\n" + ALICE) == (
        f"cch.toml: key_defaults.budget_per_month: {NEEDS_PRICES}"
    )


def test_budget_on_a_key_without_prices_is_refused_naming_the_key() -> None:
    assert error(ALICE + BOB + "budget_per_month = 5\n") == (
        f"cch.toml: keys[1].budget_per_month: {NEEDS_PRICES}"
    )


def test_budget_from_the_environment_without_prices_is_refused_naming_the_variable() -> None:
    assert env_error({"CCH_KEY_DEFAULTS_BUDGET_PER_MONTH": "20"}) == (
        f"environment: CCH_KEY_DEFAULTS_BUDGET_PER_MONTH: {NEEDS_PRICES}"
    )


def test_budget_with_any_price_is_accepted() -> None:
    config = load(PRICE + ALICE + "budget_per_month = 5\n")
    assert config.keys[0].limits.budget_per_month == 5.0


def test_empty_env_value_unsets_an_optional_limit() -> None:
    text = "[key_defaults]\nrequests_per_minute = 5\nmax_connections = 2\n" + ALICE
    config = load(text, {"CCH_KEY_DEFAULTS_REQUESTS_PER_MINUTE": ""})
    assert config.key_defaults == KeyLimitsConfig(max_connections=2)
    assert config.keys[0].limits == KeyLimitsConfig(max_connections=2)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CCH_KEY_DEFAULTS_MAX_CONNECTIONS", "0", "must be >= 1 (got 0)"),
        ("CCH_KEY_DEFAULTS_MAX_CONNECTIONS", "many", "must be an integer (got 'many')"),
        ("CCH_KEY_DEFAULTS_BUDGET_PER_MONTH", "-1", "must be a number > 0 (got -1.0)"),
        ("CCH_KEY_DEFAULTS_BUDGET_PER_MONTH", "$5", "must be a number (got '$5')"),
        ("CCH_USAGE_FLUSH_INTERVAL", "0", "must be a number > 0 (got 0.0)"),
        ("CCH_USAGE_MAX_PENDING_ROWS", "1e4", "must be an integer (got '1e4')"),
    ],
)
def test_bad_limit_or_usage_variable_is_refused_naming_it(
    name: str, value: str, expected: str
) -> None:
    assert env_error({name: value}, PRICE) == f"environment: {name}: {expected}"


def test_misspelt_key_defaults_variable_is_refused_with_a_suggestion() -> None:
    assert env_error({"CCH_KEY_DEFAULTS_REQUEST_PER_MINUTE": "1"}).startswith(
        "environment: CCH_KEY_DEFAULTS_REQUEST_PER_MINUTE: not a cch setting; "
        "did you mean CCH_KEY_DEFAULTS_REQUESTS_PER_MINUTE? (known: "
    )


def test_demo_config_has_the_default_sqlite_ledger_and_no_limits() -> None:
    config = demo_config("http://127.0.0.1:4321/v1", {})
    assert config.usage == UsageConfig() and config.usage.database == "sqlite:///cch-usage.sqlite3"
    assert config.prices == () and config.key_defaults == KeyLimitsConfig()


# --- environment overrides --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "section", "attribute", "expected"),
    [
        ("CCH_SERVER_LISTEN", "tcp:1234:interface=127.0.0.1", "server", "listen", "tcp:1234:interface=127.0.0.1"),
        ("CCH_SERVER_WEBSOCKET", "false", "server", "websocket", False),
        ("CCH_SERVER_DRAIN_TIMEOUT", "2.5", "server", "drain_timeout", 2.5),
        ("CCH_LIMITS_MAX_PENDING_FRAMES", "7", "limits", "max_pending_frames", 7),
        ("CCH_LIMITS_AUTO_PING_TIMEOUT", " 3 ", "limits", "auto_ping_timeout", 3.0),
        ("CCH_BREAKER_FAILURE_THRESHOLD", "2", "breaker", "failure_threshold", 2),
        ("CCH_BREAKER_COOLDOWN", "1.5", "breaker", "cooldown", 1.5),
        ("CCH_TUNNEL_MODE", "http", "tunnel", "mode", "http"),
        ("CCH_TUNNEL_URL", "http://127.0.0.1:1/v1/responses", "tunnel", "url", "http://127.0.0.1:1/v1/responses"),
        ("CCH_TUNNEL_SECRET", OVERRIDE_SECRET, "tunnel", "secret", OVERRIDE_SECRET),
        ("CCH_UPSTREAM_WEBSOCKET_ENABLED", "0", "upstream_websocket", "enabled", False),
        ("CCH_UPSTREAM_WEBSOCKET_IDLE_TIMEOUT", "60", "upstream_websocket", "idle_timeout", 60.0),
        ("CCH_UPSTREAM_WEBSOCKET_POOL_MAX_ENTRIES", "3", "upstream_websocket", "pool_max_entries", 3),
        ("CCH_SERVER_REPLICA", "eu-2", "server", "replica", "eu-2"),
        ("CCH_USAGE_DATABASE", "off", "usage", "database", "off"),
        ("CCH_USAGE_DATABASE", "postgres://cch@db/cch", "usage", "database", "postgresql://cch@db/cch"),
        ("CCH_USAGE_FLUSH_INTERVAL", "0.25", "usage", "flush_interval", 0.25),
        ("CCH_USAGE_MAX_PENDING_ROWS", "5", "usage", "max_pending_rows", 5),
        ("CCH_USAGE_SPILL_FILE", "/tmp/s.jsonl", "usage", "spill_file", "/tmp/s.jsonl"),
        ("CCH_USAGE_ADMIN_REPORT", "false", "usage", "admin_report", False),
        ("CCH_KEY_DEFAULTS_MAX_CONNECTIONS", " 4 ", "key_defaults", "max_connections", 4),
        ("CCH_KEY_DEFAULTS_TOKENS_PER_DAY", "1000", "key_defaults", "tokens_per_day", 1000),
    ],
)  # fmt: skip
def test_env_overrides_a_section_field(
    name: str, value: str, section: str, attribute: str, expected: Any
) -> None:
    config = load("", {name: value})
    assert getattr(getattr(config, section), attribute) == expected


def test_env_override_beats_the_file() -> None:
    text = "[limits]\nmax_pending_frames = 5\n[breaker]\ncooldown = 9\n"
    config = load(text, {"CCH_LIMITS_MAX_PENDING_FRAMES": "6"})
    assert (config.limits.max_pending_frames, config.breaker.cooldown) == (6, 9.0)


def test_secret_env_can_come_from_environment() -> None:
    config = load("", {"CCH_TUNNEL_SECRET_ENV": "MINE", "MINE": VAR_SECRET})
    assert config.tunnel.secret == VAR_SECRET


def test_empty_env_value_unsets_an_optional_string() -> None:
    assert (
        load("[tunnel]\nurl = 'http://x/v1/responses'\n", {"CCH_TUNNEL_URL": ""}).tunnel.url is None
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), (" TRUE ", True), ("True", True), ("false", False), ("0", False), ("\tFalse\n", False)],
)  # fmt: skip
def test_env_bool_accepts_true_1_false_0_ignoring_case_and_space(
    value: str, expected: bool
) -> None:
    assert load("", {"CCH_SERVER_WEBSOCKET": value}).server.websocket is expected


@pytest.mark.parametrize("value", ["yes", "on", "", "2", "truee"])
def test_env_bool_refuses_anything_else_naming_the_variable(value: str) -> None:
    assert env_error({"CCH_SERVER_WEBSOCKET": value}) == (
        f"environment: CCH_SERVER_WEBSOCKET: must be true, false, 1 or 0 (got {value!r})"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CCH_LIMITS_MAX_PENDING_FRAMES", "6.5", "must be an integer (got '6.5')"),
        ("CCH_LIMITS_MAX_PENDING_FRAMES", "", "must be an integer (got '')"),
        ("CCH_BREAKER_COOLDOWN", "soon", "must be a number (got 'soon')"),
    ],
)
def test_env_number_that_does_not_parse_names_the_variable(
    name: str, value: str, expected: str
) -> None:
    assert env_error({name: value}) == f"environment: {name}: {expected}"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CCH_LIMITS_MAX_PENDING_FRAMES", "0", "must be >= 1 (got 0)"),
        ("CCH_BREAKER_COOLDOWN", "-1", "must be a number > 0 (got -1.0)"),
        ("CCH_BREAKER_COOLDOWN", "inf", "must be a number > 0 (got inf)"),
        ("CCH_TUNNEL_MODE", "sideways", "must be one of in-process, http (got 'sideways')"),
        ("CCH_SERVER_LISTEN", "udp:1", "not a Twisted server endpoint: unknown type 'udp'"),
    ],
)
def test_env_value_that_fails_validation_names_the_variable(
    name: str, value: str, expected: str
) -> None:
    assert env_error({name: value}, "[limits]\nmax_pending_frames = 3\n").startswith(
        f"environment: {name}: {expected}"
    )


def test_cch_listen_is_an_alias_of_cch_server_listen() -> None:
    config = load("", {"CCH_LISTEN": "tcp:1111:interface=127.0.0.1"})
    assert config.server.listen == "tcp:1111:interface=127.0.0.1"


def test_cch_server_listen_wins_over_cch_listen() -> None:
    env = {
        "CCH_LISTEN": "tcp:1111:interface=127.0.0.1",
        "CCH_SERVER_LISTEN": "tcp:2222:interface=127.0.0.1",
    }
    assert load("", env).server.listen == "tcp:2222:interface=127.0.0.1"


def test_bad_cch_listen_names_the_alias() -> None:
    assert env_error({"CCH_LISTEN": "tcp:x"}).startswith("environment: CCH_LISTEN: tcp endpoint")


def test_command_line_listen_beats_environment_and_file() -> None:
    config = load(
        "[server]\nlisten = 'tcp:1:interface=127.0.0.1'\n",
        {"CCH_SERVER_LISTEN": "tcp:2:interface=127.0.0.1"},
        listen="tcp:3:interface=127.0.0.1",
    )
    assert config.server.listen == "tcp:3:interface=127.0.0.1"


def test_bad_command_line_listen_names_the_option() -> None:
    assert error("", listen="tcp:99999").startswith(
        "command line: --listen: tcp endpoint needs a port 0..65535"
    )


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)]
)
@pytest.mark.parametrize("file_value", ["true", "false"])
def test_cch_upstream_websocket_tri_state_overrides_the_file(
    value: str, expected: bool, file_value: str
) -> None:
    config = load(
        f"[upstream_websocket]\nenabled = {file_value}\n", {"CCH_UPSTREAM_WEBSOCKET": value}
    )
    assert config.upstream_websocket.enabled is expected


@pytest.mark.parametrize("value", [" false ", "TRUE", "False", "yes", "", "2"])
def test_invalid_cch_upstream_websocket_is_ignored_with_a_warning(value: str) -> None:
    with capturedLogs() as events:
        config = load("[upstream_websocket]\nenabled = false\n", {"CCH_UPSTREAM_WEBSOCKET": value})
    assert config.upstream_websocket.enabled is False
    warnings = [e for e in events if e.get("log_format") == "config_invalid_env"]
    assert len(warnings) == 1
    assert warnings[0]["name"] == "CCH_UPSTREAM_WEBSOCKET"
    assert warnings[0]["log_level"].name == "warn"
    assert {key for key in warnings[0] if not key.startswith("log_")} == {"name"}  # no value


def test_unset_cch_upstream_websocket_keeps_the_file_value_and_is_silent() -> None:
    with capturedLogs() as events:
        config = load("[upstream_websocket]\nenabled = false\n", {})
    assert config.upstream_websocket.enabled is False
    assert not [e for e in events if e.get("log_format") == "config_invalid_env"]


def test_cch_upstream_websocket_enabled_wins_over_the_tri_state() -> None:
    env = {"CCH_UPSTREAM_WEBSOCKET": "false", "CCH_UPSTREAM_WEBSOCKET_ENABLED": "true"}
    assert load("", env).upstream_websocket.enabled is True


@pytest.mark.parametrize(
    "name",
    [
        "CCH_RESPONSES_WS_INTERNAL_SECRET",
        "CCH_CODEX_E2E",
        "CCH_CODEX_E2E_FAULTS",
        "CCH_CODEX_E2E_MODEL",
        "CCH_SOMETHING_ELSE",
        "CCH_LISTENER",
        "CCH_SERVERX",
        "NOT_CCH_SERVER_FOO",
    ],
)
def test_unrelated_cch_variables_are_ignored(name: str) -> None:
    value = "whatever-" * 4  # long enough to be a secret, for CCH_RESPONSES_WS_INTERNAL_SECRET
    assert load("", {name: value}).server == DEFAULT_SERVER


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("CCH_LIMITS_MAX_PENDING_FRAME", "CCH_LIMITS_MAX_PENDING_FRAMES"),
        ("CCH_SERVER_LISTN", "CCH_SERVER_LISTEN"),
        ("CCH_UPSTREAM_WEBSOCKET_ENABLE", "CCH_UPSTREAM_WEBSOCKET_ENABLED"),
        ("CCH_TUNNEL_SECRETENV", "CCH_TUNNEL_SECRET_ENV"),
    ],
)
def test_misspelt_section_variable_is_refused_with_a_suggestion(name: str, guess: str) -> None:
    message = env_error({name: "1"})
    assert message.startswith(
        f"environment: {name}: not a cch setting; did you mean {guess}? (known: "
    )


def test_unknown_section_variable_lists_the_known_ones() -> None:
    assert env_error({"CCH_BREAKER_ZZZ": "1"}) == (
        "environment: CCH_BREAKER_ZZZ: not a cch setting; "
        "(known: CCH_BREAKER_COOLDOWN, CCH_BREAKER_FAILURE_THRESHOLD)"
    )


def test_every_schema_env_var_is_honoured() -> None:
    values = {"boolean": "false", "integer": "3", "number": "3.5"}
    for dotted, kind, _default, name in config_schema():
        if name is None or kind not in values:
            continue
        section, key = dotted.split(".")
        value = "12" if key.endswith("window_bits") else values[kind]  # windows are 9..15 bits
        config = load(PRICE, {name: value})  # a price, for key_defaults.budget_per_month
        assert getattr(getattr(config, section), key) == {"false": False, "3": 3, "12": 12, "3.5": 3.5}[value], name


# --- demo_config ------------------------------------------------------------------------------


def test_demo_config_has_one_keyless_demo_provider_on_loopback() -> None:
    config = demo_config("http://127.0.0.1:4321/v1", {})
    assert config.providers == (ProviderConfig(name="demo", base_url="http://127.0.0.1:4321/v1"),)
    assert config.providers[0].api_key is None and config.providers[0].websocket == "auto"
    assert config.keys == () and not config.auth_required
    assert config.server.listen == "tcp:8080:interface=127.0.0.1"
    assert config.source == "<demo>"
    assert uuid.UUID(config.tunnel.secret).version == 4


def test_demo_config_applies_env_and_listen_overrides() -> None:
    env = {"CCH_BREAKER_COOLDOWN": "4", "CCH_SERVER_LISTEN": "tcp:1:interface=127.0.0.1"}
    config = demo_config("http://127.0.0.1:1/v1", env, listen="tcp:0:interface=127.0.0.1")
    assert config.breaker.cooldown == 4.0
    assert config.server.listen == "tcp:0:interface=127.0.0.1"


def test_demo_config_refuses_a_public_listen() -> None:
    with pytest.raises(ConfigError, match=r"^command line: --listen: binding 'tcp:8080' "):
        demo_config("http://127.0.0.1:1/v1", {}, listen="tcp:8080")


def test_demo_config_names_demo_as_source_of_a_bad_url() -> None:
    with pytest.raises(ConfigError) as info:
        demo_config("ftp://x", {})
    assert str(info.value) == (
        "<demo>: providers[0].base_url: must be an http:// or https:// URL with a host "
        "(got 'ftp://x')"
    )


# --- config_schema ----------------------------------------------------------------------------

SECTION_CLASSES = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "breaker": BreakerConfig,
    "tunnel": TunnelConfig,
    "upstream_websocket": UpstreamWebSocketConfig,
    "continuity": ContinuityConfig,
    "usage": UsageConfig,
    "key_defaults": KeyLimitsConfig,
    "cluster": ClusterConfig,
    "tracing": TracingConfig,
    "keys[]": ClientKey,
    "providers[]": ProviderConfig,
    "prices[]": PriceConfig,
}


def test_config_schema_lists_every_field_once_with_its_default() -> None:
    rows = {key: (kind, default, env) for key, kind, default, env in config_schema()}
    assert len(rows) == len(config_schema())
    expected = {
        f"{section}.{f.name}": f.default
        for section, cls in SECTION_CLASSES.items()
        for f in dataclasses.fields(cls)
        if f.name != "limits"  # a key's limits are written flat in its table
    }
    expected.update({f"keys[].{f.name}": None for f in dataclasses.fields(KeyLimitsConfig)})
    expected["providers[].api_key_env"] = None
    expected["keys[].key_env"] = None
    expected["tunnel.secret_env"] = None
    assert {key: default for key, (_kind, default, _env) in rows.items()} == expected


def test_config_schema_env_names_follow_section_and_field() -> None:
    for key, kind, _default, env in config_schema():
        if key.startswith(("keys[]", "providers[]", "prices[]")) or kind == "array of strings":
            assert env is None  # arrays are set in the file only
        else:
            assert env == "CCH_" + key.replace(".", "_").upper()


def test_config_schema_marks_required_keys_and_type_names() -> None:
    rows = {key: (kind, default) for key, kind, default, _env in config_schema()}
    assert rows["keys[].key"] == ("string", dataclasses.MISSING)
    assert rows["providers[].base_url"] == ("string", dataclasses.MISSING)
    assert rows["providers[].models"] == ("array of strings", ())
    assert rows["providers[].headers"] == ("table of strings", ())
    assert rows["server.websocket"] == ("boolean", True)
    assert rows["limits.max_pending_frames"] == ("integer", 64)
    assert rows["breaker.cooldown"] == ("number", 30.0)


def test_every_schema_key_is_accepted_in_a_file() -> None:
    for key, _kind, _default, _env in config_schema():
        section, name = key.split(".")
        if section.endswith("[]"):
            allowed = error(f"[[{section[:-2]}]]\nzzz = 1\n")
        else:
            allowed = error(f"[{section}]\nzzz = 1\n")
        assert name in allowed.split("(allowed: ")[1], key


def test_a_client_key_can_come_from_the_environment(tmp_path: Any) -> None:
    path = tmp_path / "cch.toml"
    path.write_text('[[keys]]\nname = "alice"\nkey_env = "ALICE_KEY"\n')
    config = load_config(str(path), {"ALICE_KEY": "sk-cch-alice-0123456789"})
    assert config.keys[0].key == "sk-cch-alice-0123456789"
    with pytest.raises(ConfigError, match=r"keys\[0\]\.key_env: .*ALICE_KEY"):
        load_config(str(path), {})
    path.write_text(
        '[[keys]]\nname = "alice"\nkey = "sk-cch-alice-0123456789"\nkey_env = "ALICE_KEY"\n'
    )
    with pytest.raises(ConfigError, match="either key or key_env"):
        load_config(str(path), {"ALICE_KEY": "x" * 10})


# --- [cluster] (issue 15) ----------------------------------------------------------------------



def _own_replica() -> str:
    import os

    return f"{socket.gethostname()}-{os.getpid()}"


def test_cluster_is_off_by_default_with_a_replica_name_of_host_and_pid() -> None:
    config = load_config(None, {})
    assert config.cluster == ClusterConfig(replica=_own_replica())
    assert not config.cluster.enabled
    assert ClusterConfig() == ClusterConfig("", "", 15.0, "local", 1, "cch:")


def test_cluster_section_sets_every_key() -> None:
    config = load(
        '[cluster]\nredis = "redis://:pw@redis.internal:6380/2"\nreplica = "eu-1a"\nlease_ttl = 9\n'
        'on_redis_down = "refuse"\nexpected_replicas = 3\nkey_prefix = "team:"\n'
    )
    assert config.cluster == ClusterConfig("redis://:pw@redis.internal:6380/2", "eu-1a", 9.0, "refuse", 3, "team:")
    assert config.cluster.enabled


def test_cluster_replica_defaults_to_the_server_replica_when_one_is_named() -> None:
    assert load('[server]\nreplica = "pod-7"\n').cluster.replica == "pod-7"
    named = load('[server]\nreplica = "pod-7"\n[cluster]\nreplica = "lease-7"\n')
    assert (named.server.replica, named.cluster.replica) == ("pod-7", "lease-7")
    # Unnamed, the ledger's host name is not enough for leases: the pid is added.
    unnamed = load("")
    assert (unnamed.server.replica, unnamed.cluster.replica) == (socket.gethostname(), _own_replica())


def test_cluster_keys_come_from_the_environment_too() -> None:
    env = {
        "CCH_CLUSTER_REDIS": "redis://127.0.0.1:6379/0",
        "CCH_CLUSTER_LEASE_TTL": "4.5",
        "CCH_CLUSTER_ON_REDIS_DOWN": "refuse",
        "CCH_CLUSTER_EXPECTED_REPLICAS": "5",
        "CCH_CLUSTER_KEY_PREFIX": "x:",
        "CCH_CLUSTER_REPLICA": "r1",
    }
    assert load('[cluster]\nredis = "redis://other:1/0"\n', env).cluster == ClusterConfig(
        "redis://127.0.0.1:6379/0", "r1", 4.5, "refuse", 5, "x:"
    )
    assert env_error({"CCH_CLUSTER_ON_REDIS_DOWN": "crash"}) == (
        "environment: CCH_CLUSTER_ON_REDIS_DOWN: must be one of local, refuse (got 'crash')"
    )
    assert env_error({"CCH_CLUSTER_EXPECTED_REPLICA": "2"}).startswith(
        "environment: CCH_CLUSTER_EXPECTED_REPLICA: not a cch setting; did you mean "
        "CCH_CLUSTER_EXPECTED_REPLICAS?"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://:s3cret@redis:6379/0", "must be a redis:// URL with a host"),
        ("rediss://:s3cret@redis:6379/0", "must be a redis:// URL with a host"),
        ("redis://:s3cret@/0", "must be a redis:// URL with a host"),
        ("redis://:s3cret@redis:99999/0", "not a valid Redis URL"),
        ("redis://:s3cret@redis:6379/zero", "the path must be a database number"),
        ("redis://:s3cret@redis:6379/0/1", "the path must be a database number"),
        ("redis://:s3cret@redis:6379/0?timeout=1", "takes no query or fragment"),
    ],
)
def test_a_bad_redis_url_is_named_without_its_password(url: str, problem: str) -> None:
    message = error(f'[cluster]\nredis = "{url}"\n')
    assert message.startswith(f"cch.toml: cluster.redis: {problem}")
    assert "s3cret" not in message and "***@" in message
    from_env = env_error({"CCH_CLUSTER_REDIS": url})
    assert from_env.startswith(f"environment: CCH_CLUSTER_REDIS: {problem}") and "s3cret" not in from_env


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1", "redis://127.0.0.1:6379", "redis://h:1/", "redis://u:p%40ss@h:6379/15", "redis://[::1]:6379/0"]
)
def test_redis_urls_of_every_documented_form_are_accepted(url: str) -> None:
    assert load(f'[cluster]\nredis = "{url}"\n').cluster.redis == url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lease_ttl = 0.5", "cch.toml: cluster.lease_ttl: must be at least 1 second: leases are renewed every lease_ttl/3 (got 0.5)"),
        ("lease_ttl = 0", "cch.toml: cluster.lease_ttl: must be a number > 0 (got 0.0)"),
        ("on_redis_down = 'fail'", "cch.toml: cluster.on_redis_down: must be one of local, refuse (got 'fail')"),
        ("expected_replicas = 0", "cch.toml: cluster.expected_replicas: must be >= 1 (got 0)"),
        ("expected_replicas = 1.5", "cch.toml: cluster.expected_replicas: must be an integer (got float)"),
        ("key_prefix = ''", "cch.toml: cluster.key_prefix: must not be empty: it keeps cch's keys apart from others in the database, e.g. \"cch:\""),
        ("key_prefix = 'cch{a}:'", "cch.toml: cluster.key_prefix: must not hold '{' or '}', which would make a Redis Cluster hash tag (got 'cch{a}:')"),
        ("key_prefix = 'my app:'", "cch.toml: cluster.key_prefix: must be printable ASCII without spaces (got 'my app:')"),
        ("replica = 'eu 1'", "cch.toml: cluster.replica: must be printable ASCII without spaces (got 'eu 1')"),
        ("redis = 6379", "cch.toml: cluster.redis: must be a string (got integer)"),
    ],
)
def test_cluster_values_are_checked_with_one_line_messages(text: str, expected: str) -> None:
    assert error(f"[cluster]\n{text}\n") == expected


def test_an_unknown_cluster_key_gets_a_suggestion() -> None:
    assert error("[cluster]\nredis_url = 'redis://h'\n") == (
        "cch.toml: cluster.redis_url: unknown key; did you mean redis? (allowed: expected_replicas, "
        "key_prefix, lease_ttl, on_redis_down, redis, replica)"
    )


def test_config_schema_lists_the_cluster_keys_and_their_variables() -> None:
    rows = {key: (kind, default, env) for key, kind, default, env in config_schema() if key.startswith("cluster.")}
    assert rows == {
        "cluster.redis": ("string", "", "CCH_CLUSTER_REDIS"),
        "cluster.replica": ("string", "", "CCH_CLUSTER_REPLICA"),
        "cluster.lease_ttl": ("number", 15.0, "CCH_CLUSTER_LEASE_TTL"),
        "cluster.on_redis_down": ("string", "local", "CCH_CLUSTER_ON_REDIS_DOWN"),
        "cluster.expected_replicas": ("integer", 1, "CCH_CLUSTER_EXPECTED_REPLICAS"),
        "cluster.key_prefix": ("string", "cch:", "CCH_CLUSTER_KEY_PREFIX"),
    }


def test_the_cluster_config_never_shows_the_redis_password_in_its_repr() -> None:
    config = load('[cluster]\nredis = "redis://:s3cret@h:6379/0"\n')
    assert "s3cret" not in repr(config.cluster) and "s3cret" not in repr(config)


# --- [tracing] --------------------------------------------------------------------------------


def test_tracing_is_off_by_default() -> None:
    assert load("").tracing == TracingConfig(enabled=False)


def test_tracing_is_turned_on_by_the_file_or_the_environment() -> None:
    assert load("[tracing]\nenabled = true\n").tracing.enabled
    assert load("", {"CCH_TRACING_ENABLED": "true"}).tracing.enabled
    assert not load("[tracing]\nenabled = true\n", {"CCH_TRACING_ENABLED": "0"}).tracing.enabled


@pytest.mark.parametrize(
    ("text", "env", "where"),
    [
        ("[tracing]\nenabled = true\n", {}, "cch.toml: tracing.enabled"),
        ("", {"CCH_TRACING_ENABLED": "1"}, "environment: CCH_TRACING_ENABLED"),
    ],
)
def test_tracing_without_the_otel_extra_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], where: str
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    message = error(text, env)
    assert message.startswith(f"{where}: needs OpenTelemetry, which is not installed ")
    assert "pip install 'cch[otel]'" in message
    # Off, nothing is asked of the packages.
    assert not load("[tracing]\nenabled = false\n").tracing.enabled


# --- permessage-deflate ([limits] websocket_compression*, [upstream_websocket] compression*) ---


def test_compression_is_on_at_the_edge_and_off_upstream_with_32_kib_windows_by_default() -> None:
    config = load("")
    assert (config.limits.websocket_compression, config.limits.websocket_compression_window_bits) == (True, 15)
    assert (config.upstream_websocket.compression, config.upstream_websocket.compression_window_bits) == (False, 15)


def test_compression_is_set_by_the_file_or_the_environment() -> None:
    config = load(
        "[limits]\nwebsocket_compression = false\nwebsocket_compression_window_bits = 9\n"
        "[upstream_websocket]\ncompression = false\ncompression_window_bits = 12\n"
    )
    assert (config.limits.websocket_compression, config.limits.websocket_compression_window_bits) == (False, 9)
    assert (config.upstream_websocket.compression, config.upstream_websocket.compression_window_bits) == (False, 12)
    env = {"CCH_LIMITS_WEBSOCKET_COMPRESSION_WINDOW_BITS": "10", "CCH_UPSTREAM_WEBSOCKET_COMPRESSION": "1"}
    config = load("", env)
    assert config.limits.websocket_compression_window_bits == 10 and config.upstream_websocket.compression


@pytest.mark.parametrize(
    ("text", "env", "where", "got"),
    [
        ("[limits]\nwebsocket_compression_window_bits = 8\n", {}, "cch.toml: limits.websocket_compression_window_bits", 8),
        ("[upstream_websocket]\ncompression_window_bits = 16\n", {}, "cch.toml: upstream_websocket.compression_window_bits", 16),
        ("", {"CCH_LIMITS_WEBSOCKET_COMPRESSION_WINDOW_BITS": "3"}, "environment: CCH_LIMITS_WEBSOCKET_COMPRESSION_WINDOW_BITS", 3),
    ],
)
def test_a_compression_window_outside_9_to_15_bits_is_refused_saying_what_it_means(
    text: str, env: dict[str, str], where: str, got: int
) -> None:
    assert error(text, env) == (
        f"{where}: must be 9..15: a permessage-deflate window of 2**bits bytes, 512 B to 32 KiB (got {got})"
    )
