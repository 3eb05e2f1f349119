"""The gateway's configuration: a TOML file plus ``CCH_*`` environment overrides.

Config is data made once at start-up (docs/configuration.md; the safe defaults:
docs/security.md#threat-model): every problem is found here and reported as one line naming
where it came from (the file, the environment variable or the command line), the key and what
is wrong, so a mistake never surfaces later as a traceback deep inside the running service.

Validation is table-driven: each TOML table is checked against the fields of its dataclass
(type by annotation, numbers positive), plus per-key rules in ``_RULES`` and the form a value is
stored in (``_NORMAL_FORMS``); a [[keys]] table also holds its limits flat (``_INLINE``), laid
over [key_defaults]; the few rules that span tables are checked in ``_build``.
Messages never show a secret (keys, tokens and secrets by their length, URLs without userinfo).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from ipaddress import ip_address, ip_network
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from cch.addresses import is_loopback_host
from cch.headers import FRAMING, HEADER_NAME, never_forwarded_reason
from cch.secret import RESERVED_PREFIX, SECRET_ENV, new_secret

__all__ = [
    "BreakerConfig",
    "ClientKey",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "ProviderConfig",
    "ServerConfig",
    "TracingConfig",
    "TunnelConfig",
    "UpstreamWebSocketConfig",
    "ContinuityConfig",
    "KeyLimitsConfig",
    "PriceConfig",
    "UsageConfig",
    "config_schema",
    "demo_config",
    "is_loopback_endpoint",
    "load_config",
]

log = Logger()


class ConfigError(Exception):
    """A configuration problem a person can act on. str(exc) is one line naming the source
    (file path or 'environment' or '<demo>'), the key path (e.g. providers[1].base_url, indexes
    counted from 0, or CCH_LIMITS_MAX_PENDING_FRAMES) and the problem."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "tcp:8080:interface=127.0.0.1"  # Twisted server endpoint string
    websocket: bool = True  # client WebSocket edge on; off -> upgrades answered 426
    drain_timeout: float = 30.0  # seconds in-flight turns may finish on stop
    metrics_listen: str | None = None  # separate endpoint for GET /metrics (no auth there)
    admin_token: str | None = None  # Bearer token for /metrics on the main port
    # Browser origins ("https://app.example.com") whose requests are served; a request that
    # carries any other Origin header is refused 403 (coding agents and SDKs send none).
    allowed_origins: tuple[str, ...] = ()
    # Without [[keys]]: Host names accepted besides loopback ones (DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 10000  # open client sockets at once; beyond it 503 and close
    # Proxies (addresses or CIDR ranges) whose X-Forwarded-For names the client address
    # (for the failed-auth budget and logs).
    trusted_proxies: tuple[str, ...] = ()
    # This replica's name in usage rows; "" in the file = socket.gethostname(), resolved at load.
    replica: str = ""


@dataclass(frozen=True)
class KeyLimitsConfig:
    """What one client key may use; None = unlimited. Written in [key_defaults] and, field by
    field, in each [[keys]] table (the key's own value wins)."""

    max_connections: int | None = None  # client WebSocket connections at once
    max_concurrent_turns: int | None = None
    requests_per_minute: int | None = None  # turns started in the last 60 s
    tokens_per_minute: int | None = None  # input + output tokens in the last 60 s
    tokens_per_day: int | None = None  # input + output tokens this UTC day
    budget_per_month: float | None = None  # USD this UTC month, priced by [[prices]]
    models: tuple[str, ...] | None = None  # models this key may ask for


@dataclass(frozen=True)
class ClientKey:
    name: str
    key: str
    websocket: bool = True  # this key may use the WebSocket edge
    # Written flat in the [[keys]] table; already merged with [key_defaults] at load.
    limits: KeyLimitsConfig = field(default_factory=KeyLimitsConfig)


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str  # http(s) URL, e.g. https://api.openai.com/v1
    api_key: str | None = None  # resolved: from api_key, or from env var named by api_key_env
    priority: int = 0  # lower tried first
    weight: int = 1  # >= 1, weighted random among equal priority
    models: tuple[str, ...] = ()  # empty = serves every model
    # static extra headers (never authorization / x-cch-*)
    headers: tuple[tuple[str, str], ...] = ()
    websocket: str = "auto"  # auto | on | off
    connect_timeout: float = 10.0
    first_byte_timeout: float = 60.0
    idle_timeout: float = 300.0
    tls_ca: str | None = None  # PEM file of CA certificates trusted for this provider (private CA)
    # Client headers dropped by default that may reach this provider (openai-organization,
    # openai-project: who is billed is the operator's choice, not the client's).
    forward_headers: tuple[str, ...] = ()
    # The API it speaks: "responses" (passed through), "chat" (Chat Completions) or
    # "anthropic" (Messages), the last two translated (cch.translate; docs/providers.md).
    api: str = "responses"
    # Model names renamed on the way upstream: client's name -> the provider's.
    model_map: tuple[tuple[str, str], ...] = ()
    # A translated provider's output cap for a request that sets none (Anthropic requires
    # one: 32000 otherwise, more than some models allow).
    max_output_tokens: int | None = None

    @property
    def translated(self) -> bool:
        return self.api != "responses"

    def upstream_model(self, model: str) -> str:
        """The provider's name for the client's ``model``."""
        for asked, served in self.model_map:
            if asked == model:
                return served
        return model


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 32 * 1024 * 1024
    max_pending_frames: int = 64
    max_pending_bytes: int = 64 * 1024 * 1024
    outbound_send_timeout: float = 30.0
    max_request_body_bytes: int = 100 * 1024 * 1024  # HTTP POST /v1/responses body cap
    max_json_response_bytes: int = 64 * 1024 * 1024  # non-SSE upstream body cap
    auto_ping_interval: float = 25.0
    auto_ping_timeout: float = 20.0
    handshake_timeout: float = 10.0  # seconds for a whole request head (not reset per byte)
    max_upstream_event_bytes: int = 32 * 1024 * 1024  # one SSE event or upstream WS message
    auth_failure_limit: int = 20  # failed key checks per client address per window
    auth_failure_window: float = 60.0  # seconds; past the limit the address gets 429 until it ends
    # permessage-deflate (RFC 7692) with clients that offer it; every zlib window of it on our
    # side (and the one clients are asked to use, when they let us) is 2**bits bytes, 9..15.
    websocket_compression: bool = True
    websocket_compression_window_bits: int = 15


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5  # consecutive failures that open a provider's breaker
    cooldown: float = 30.0  # seconds open before a half-open trial


@dataclass(frozen=True)
class TunnelConfig:
    mode: str = "in-process"  # in-process | http
    url: str | None = None  # http mode: the /v1/responses URL to POST turns to; None = this
    # gateway's own listener (resolved by the service at start)
    secret: str = ""  # internal secret; resolved (see _resolve_secret), never empty after load


@dataclass(frozen=True)
class UpstreamWebSocketConfig:
    enabled: bool = True  # global toggle for upstream WS attempts
    handshake_timeout: float = 10.0
    first_event_timeout: float = 20.0
    pool_max_entries: int = 512
    idle_timeout: float = 3900.0
    unsupported_ttl: float = 300.0
    max_buffer_bytes: int = 8 * 1024 * 1024
    # Retire an idle retained socket this old before the next turn (OpenAI caps a socket at
    # 60 minutes); the turn is made whole by transcript replay.
    max_socket_age: float = 3300.0
    # Re-send a turn over HTTP when the upstream WebSocket took the frame but sent no event
    # before first_event_timeout (off: the turn ends with upstream_first_event_timeout, since
    # the provider may already be working on, and billing, the first copy).
    fallback_after_send: bool = False
    # Offer permessage-deflate (RFC 7692) to upstreams; windows of 2**bits bytes, 9..15.
    compression: bool = False
    compression_window_bits: int = 15


@dataclass(frozen=True)
class ContinuityConfig:
    enabled: bool = True  # keep transcripts; replay, local warm-up, canonical errors
    max_bytes_per_connection: int = 16 * 1024 * 1024
    max_responses_per_connection: int = 256
    max_sessions: int = 4096  # transcripts kept at once (HTTP-tunnel sessions included)


@dataclass(frozen=True)
class UsageConfig:
    """The usage ledger: one row per turn, written in batches off the hot path
    (docs/configuration.md#usage--the-usage-ledger)."""

    # "off" | "sqlite:///<path>" (relative to the run directory; sqlite:////abs for /abs) |
    # "postgresql://[user[:password]@][host][:port][/db]" (libpq's PG* variables fill the rest)
    database: str = "sqlite:///cch-usage.sqlite3"
    flush_interval: float = 1.0  # seconds between batched writes
    max_pending_rows: int = 10000  # rows held while the database is down, then spilled
    spill_file: str = "cch-usage-spill.jsonl"  # JSON lines, relative to the run directory
    admin_report: bool = True  # GET /admin/usage (needs server.admin_token)

    @property
    def enabled(self) -> bool:
        return self.database != "off"


@dataclass(frozen=True)
class PriceConfig:
    """USD per million tokens for one model (and its dated snapshots, see cch/usage/prices.py)."""

    model: str
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None  # None = input_per_mtok


@dataclass(frozen=True)
class ClusterConfig:
    """Several replicas sharing per-key limits through Redis (docs/scaling.md); off without
    ``redis``, and single-process behaviour is then unchanged."""

    # "" = off | "redis://[[user]:password@]host[:port][/db]" (port 6379, db 0 by default)
    redis: str = field(default="", repr=False)  # its password never reaches a log line
    # This replica's name in its Redis leases; "" = server.replica when that is set, else
    # "<host name>-<pid>" (several replicas may share a host), resolved at load.
    replica: str = ""
    lease_ttl: float = 15.0  # seconds a dead replica's slots stay taken (renewed every ttl/3)
    on_redis_down: str = "local"  # local (per-replica share of each limit) | refuse (503)
    expected_replicas: int = 1  # "local" divides each limit by this, rounded up, at least 1
    key_prefix: str = "cch:"  # every Redis key this gateway writes starts with it

    @property
    def enabled(self) -> bool:
        return bool(self.redis)


@dataclass(frozen=True)
class TracingConfig:
    """One OpenTelemetry span per turn, exported over OTLP/HTTP (docs/tracing.md); where to and
    how are the standard ``OTEL_*`` variables."""

    enabled: bool = False  # needs pip install 'cch[otel]'


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    keys: tuple[ClientKey, ...] = ()
    providers: tuple[ProviderConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    upstream_websocket: UpstreamWebSocketConfig = field(default_factory=UpstreamWebSocketConfig)
    continuity: ContinuityConfig = field(default_factory=ContinuityConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    prices: tuple[PriceConfig, ...] = ()
    key_defaults: KeyLimitsConfig = field(default_factory=KeyLimitsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = "<defaults>"  # where it came from, for messages

    @property
    def auth_required(self) -> bool:
        """Client keys are checked only when some are configured."""
        return bool(self.keys)


# --- public entry points ---------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    *,
    listen: str | None = None,
) -> Config:
    """Read TOML at path (None = no file, defaults only), apply CCH_* env overrides,
    then the explicit `listen` override (from the command line), validate, return Config.
    env defaults to os.environ. Raises ConfigError."""
    if path is None:
        return _build({}, "<defaults>", env, listen)
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _build(raw, source, env, listen)


def demo_config(
    fake_upstream_base_url: str,
    env: Mapping[str, str] | None = None,
    *,
    listen: str | None = None,
) -> Config:
    """Config for `twistd -n cch --demo`: no client keys, one provider named "demo" at the given
    base URL (no api key, websocket "auto"), listen default tcp:8080:interface=127.0.0.1,
    env overrides and the listen override applied as in load_config, source "<demo>"."""
    raw = {"providers": [{"name": "demo", "base_url": fake_upstream_base_url}]}
    return _build(raw, "<demo>", env, listen)


def is_loopback_endpoint(description: str) -> bool:
    """True when a Twisted server endpoint string listens only on loopback: tcp/ssl with
    interface= 127.x.x.x, ::1 or localhost; unix: endpoints count as loopback. tcp without
    interface (all interfaces) or 0.0.0.0 / :: -> False. Unparseable strings -> False."""
    try:
        kind, params = _parse_endpoint(description)
    except ValueError:
        return False
    if kind == "unix":
        return True
    return is_loopback_host(params.get("interface", ""))


def config_schema() -> list[tuple[str, str, Any, str | None]]:
    """Every option as (dotted_key, type_name, default, env_var_or_None), for generating and
    checking the docs. Array entries are spelled ``keys[].name``; a required key's default is
    ``dataclasses.MISSING``. Aliases not listed: CCH_LISTEN (= CCH_SERVER_LISTEN) and the
    tri-state CCH_UPSTREAM_WEBSOCKET (= upstream_websocket.enabled); tunnel.secret also falls
    back to CCH_RESPONSES_WS_INTERNAL_SECRET."""
    rows: list[tuple[str, str, Any, str | None]] = []
    for section, cls in _SECTIONS.items():
        for key, (kind, default) in _keys_of(cls).items():
            rows.append((f"{section}.{key}", _KINDS[kind].name, default, _env_var(section, key)))
    for section, cls in _ARRAYS.items():
        for key, (kind, default) in _keys_of(cls).items():
            rows.append((f"{section}[].{key}", _KINDS[kind].name, default, None))
    return rows


# --- value kinds (by field annotation) -------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1"):
        return True
    if word in ("false", "0"):
        return False
    raise ValueError(text)


@dataclass(frozen=True)
class _Kind:
    name: str  # shown in messages ("must be a <name>") and config_schema()
    accepts: Callable[[Any], bool]  # is this TOML value of the right type?
    convert: Callable[[Any], Any]  # TOML value -> field value
    from_env: Callable[[str], Any] | None = None  # env text -> field value (None = no env)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _string_table(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _same(value: Any) -> Any:
    return value


# Keyed by the annotation text (this module uses postponed annotations, so Field.type is a str).
_KINDS: dict[str, _Kind] = {
    "bool": _Kind("boolean", lambda v: isinstance(v, bool), _same, _env_bool),
    "int": _Kind("integer", _is_int, _same, lambda s: int(s.strip())),
    "float": _Kind(
        "number", lambda v: _is_int(v) or isinstance(v, float), float, lambda s: float(s.strip())
    ),
    "str": _Kind("string", lambda v: isinstance(v, str), _same, _same),
    # An empty environment value unsets an optional string.
    "str | None": _Kind("string", lambda v: isinstance(v, str), _same, lambda s: s or None),
    # An empty environment value unsets an optional limit, as it does an optional string.
    "int | None": _Kind("integer", _is_int, _same, lambda s: int(s) if s.strip() else None),
    "float | None": _Kind(
        "number",
        lambda v: _is_int(v) or isinstance(v, float),
        float,
        lambda s: float(s) if s.strip() else None,
    ),
    "tuple[str, ...]": _Kind("array of strings", _strings, tuple),
    "tuple[str, ...] | None": _Kind("array of strings", _strings, tuple),
    "tuple[tuple[str, str], ...]": _Kind(
        "table of strings", _string_table, lambda v: tuple(v.items())
    ),
}

_SECTIONS: dict[str, type] = {
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
}
_ARRAYS: dict[str, type] = {"keys": ClientKey, "providers": ProviderConfig, "prices": PriceConfig}

# A field whose dataclass is written flat in the same TOML table: a key's limits sit beside
# its name, as in [key_defaults]. Rules for those keys are looked up under the inner class.
_INLINE: dict[type, tuple[str, type]] = {ClientKey: ("limits", KeyLimitsConfig)}

# TOML keys that are not dataclass fields: they name where a secret comes from.
_EXTRA_KEYS: dict[type, dict[str, tuple[str, Any]]] = {
    ClientKey: {"key_env": ("str | None", None)},
    ProviderConfig: {"api_key_env": ("str | None", None)},
    TunnelConfig: {"secret_env": ("str | None", None)},
}


def _keys_of(cls: type) -> dict[str, tuple[str, Any]]:
    """The TOML keys a table for ``cls`` may hold: key -> (annotation, default or MISSING)."""
    inline_field, inline_cls = _INLINE.get(cls, ("", None))
    keys = {f.name: (str(f.type), f.default) for f in fields(cls) if f.name != inline_field}
    if inline_cls is not None:
        keys.update(_keys_of(inline_cls))
    keys.update(_EXTRA_KEYS.get(cls, {}))
    return keys


def _owner(cls: type, key: str) -> type:
    """The dataclass whose rules apply to ``key`` in a table for ``cls`` (see _INLINE)."""
    inline_cls = _INLINE.get(cls, ("", None))[1]
    if inline_cls is not None and key in {f.name for f in fields(inline_cls)}:
        return inline_cls
    return cls


# --- per-key rules -----------------------------------------------------------------------------

_GATEWAY_HEADERS = ("authorization", "connection", *sorted(FRAMING))
_MIN_KEY_CHARS = 16  # client keys and server.admin_token
_MIN_SECRET_CHARS = 32  # tunnel.secret; the generated one (a UUIDv4) has 36
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ENDPOINT_PARAMS: dict[str, tuple[str, ...]] = {  # positional order, as twisted parses them
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile"),
}
_LISTEN_EXAMPLE = "tcp:8080:interface=127.0.0.1"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value not in choices:
            return f"must be one of {', '.join(choices)} (got {value!r})"
        return None

    return check


def _not_empty(value: str) -> str | None:
    return "must not be empty" if not value else None


def _client_key(value: str) -> str | None:
    # Never the key itself (messages end up in logs): its length or a position only.
    if len(value) < _MIN_KEY_CHARS:
        return f"must be at least {_MIN_KEY_CHARS} characters (got {len(value)})"
    if value != value.strip():
        return "must not start or end with whitespace"
    odd = next((i for i, char in enumerate(value) if not " " <= char <= "~"), None)
    if odd is not None:
        return f"must be printable ASCII only (character {odd + 1} is not)"
    return None


def _tunnel_secret(value: str) -> str | None:
    # Empty means "not given here" (_resolve_secret looks further). Never the secret itself.
    if value and len(value) < _MIN_SECRET_CHARS:
        return (
            f"must be at least {_MIN_SECRET_CHARS} characters (got {len(value)}); make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return None


def _database(value: str) -> str | None:
    """The ledger's database URL. Shown without userinfo: a password may sit in it."""
    example = (
        '"off", "sqlite:///cch-usage.sqlite3" (relative to the run directory; '
        '"sqlite:////var/lib/cch/usage.sqlite3" for an absolute path) or '
        '"postgresql://user@host:5432/db"'
    )
    if value == "off":
        return None
    if value.startswith("sqlite:"):
        if value.startswith("sqlite:///") and value.removeprefix("sqlite:///"):
            return None
        return f"a SQLite database is sqlite:/// and a file path, e.g. {example} (got {value!r})"
    if value.startswith(("postgresql://", "postgres://")):
        try:
            urlsplit(value).port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            return (
                f"not a valid PostgreSQL URL (got {_shown_url(value)!r}); percent-encode ':', "
                "'/' and '@' in a password, or leave it out and set PGPASSWORD or ~/.pgpass"
            )
        return None
    return f"must be {example} (got {_shown_url(value)!r})"


_REDIS_EXAMPLE = '"redis://127.0.0.1:6379/0" or "redis://:password@redis.internal:6379/0"'


def _redis_url(value: str) -> str | None:
    """cluster.redis: "" (off) or redis://[[user]:password@]host[:port][/db]. Shown without
    userinfo: a password may sit in it."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError:
        return (
            f"not a valid Redis URL (got {_shown_url(value)!r}); the port must be 0..65535, and "
            "':', '/' and '@' in a password percent-encoded"
        )
    if parts.scheme != "redis" or not parts.hostname:
        return f"must be a redis:// URL with a host, e.g. {_REDIS_EXAMPLE} (got {_shown_url(value)!r})"
    db = parts.path.removeprefix("/")
    if "/" in db or not (db == "" or (db.isascii() and db.isdecimal())):
        return f"the path must be a database number, e.g. {_REDIS_EXAMPLE} (got {_shown_url(value)!r})"
    if parts.query or parts.fragment:
        return f"takes no query or fragment, e.g. {_REDIS_EXAMPLE} (got {_shown_url(value)!r})"
    return None


def _lease_ttl(value: float) -> str | None:
    if value < 1.0:
        return f"must be at least 1 second: leases are renewed every lease_ttl/3 (got {value})"
    return None


def _name_in_keys(value: str) -> str | None:
    """cluster.replica and cluster.key_prefix go into Redis keys and lease ids."""
    if any(not "!" <= char <= "~" for char in value):
        return f"must be printable ASCII without spaces (got {value!r})"
    return None


def _window_bits(value: int) -> str | None:
    if not 9 <= value <= 15:
        return f"must be 9..15: a permessage-deflate window of 2**bits bytes, 512 B to 32 KiB (got {value})"
    return None


def _key_prefix(value: str) -> str | None:
    if not value:
        return 'must not be empty: it keeps cch\'s keys apart from others in the database, e.g. "cch:"'
    if "{" in value or "}" in value:
        return f"must not hold '{{' or '}}', which would make a Redis Cluster hash tag (got {value!r})"
    return _name_in_keys(value)


def _tracing_installed(enabled: bool) -> str | None:
    """tracing.enabled needs the ``otel`` extra; asked only when it is on (cch.tracing)."""
    if not enabled:
        return None
    from cch.tracing import missing_packages

    return missing_packages()


def _postgresql_scheme(value: str) -> str:
    """One spelling for the ledger to dispatch on; libpq takes postgres:// as a synonym."""
    if value.startswith("postgres://"):
        return "postgresql://" + value.removeprefix("postgres://")
    return value


def _model_names(values: tuple[str, ...]) -> str | None:
    # An empty list would refuse every turn: leave models out to allow any model.
    if not values:
        return "must list at least one model (leave it out to allow every model)"
    if any(not value.strip() for value in values):
        return "must not hold an empty model name"
    return None


def _shown_url(value: str) -> str:
    """``value`` as a message may show it: any ``user:password@`` replaced by ``***@``.

    Everything up to the last ``@`` counts as userinfo, so a password holding ``/`` or ``@``
    is never half shown (a path with an ``@`` is over-masked, which is harmless here)."""
    scheme, separator, rest = value.partition("://")
    if not separator:
        scheme, rest = "", value
    if "@" not in rest:
        return value
    return f"{scheme}{separator}***@{rest.rpartition('@')[2]}"


def _http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        ok = False
    if ok:
        return None
    return f"must be an http:// or https:// URL with a host (got {_shown_url(value)!r})"


def _tunnel_url(value: str) -> str | None:
    problem = _http_url(value)
    if problem is None:
        parts = urlsplit(value)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            return (
                "must be an https:// URL, since every turn carries the internal secret; "
                "http:// only to a loopback host (127.0.0.0/8, ::1, localhost) "
                f"(got {_shown_url(value)!r})"
            )
    return problem


def _origins(values: tuple[str, ...]) -> str | None:
    example = "e.g. 'https://app.example.com'"
    for value in values:
        if value.strip() == "*":
            return f"'*' is not accepted: list the browser origins one by one, {example}"
        try:
            parts = urlsplit(value.strip())
            scheme, host, port = parts.scheme, parts.hostname, parts.port
            if host and not host.isascii():
                host = host.encode("idna").decode("ascii")  # what browsers send
        except (ValueError, UnicodeError):
            scheme, host, port = "", None, None
        if scheme not in _DEFAULT_PORTS or not host:
            return (
                f"{_shown_url(value)!r} is not an origin: write scheme://host[:port] with "
                f"scheme http or https, {example}"
            )
        shown_host = f"[{host}]" if ":" in host else host
        expected = f"{scheme}://{shown_host}"
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            expected += f":{port}"
        if value != expected:
            return (
                f"{_shown_url(value)!r} is not an origin as browsers send it: write {expected!r} "
                "(scheme://host[:port] in lower case; no path, query, trailing slash or default "
                "port)"
            )
    return None


def _hosts(values: tuple[str, ...]) -> str | None:
    for value in values:
        if "*" in value:
            return f"{value!r}: wildcards are not supported; list each host name"
        if "/" in value:
            return f"{value!r}: write the host name or IP address alone, without scheme or path"
        bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        try:
            ip_address(bare)
            continue
        except ValueError:
            pass
        if ":" in value:
            return f"{value!r}: write the host name or IP address without a port (any port works)"
        name = value.removesuffix(".")
        if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
            return f"{value!r} is not a host name or IP address"
    return None


def _host_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """As a Host header's name part compares: lower case, IPv6 without brackets, no final dot."""
    return tuple(value.strip("[]").removesuffix(".").lower() for value in values)


def _networks(values: tuple[str, ...]) -> str | None:
    for value in values:
        try:
            ip_network(value, strict=False)
        except ValueError:
            return (
                f"{value!r} is not an IP address or CIDR network "
                "(e.g. '10.0.0.0/8', '192.0.2.7', '2001:db8::/32')"
            )
    return None


def _forward_headers(names: tuple[str, ...]) -> str | None:
    for name in names:
        if not HEADER_NAME.fullmatch(name):
            return f"{name!r} is not a valid header name"
        reason = never_forwarded_reason(name)
        if reason is not None:
            return f"{name!r} is never forwarded: {reason}"
    return None


def _lower_case(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(value.lower() for value in values)


def _pem_file(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if b"-----BEGIN CERTIFICATE-----" not in text:
        return f"{path!r} holds no PEM certificate"
    return None


def _model_map(pairs: tuple[tuple[str, str], ...]) -> str | None:
    for asked, served in pairs:
        if not asked.strip() or not served.strip():
            return f"model names may not be empty (got {asked!r} = {served!r})"
    return None


def _extra_headers(headers: tuple[tuple[str, str], ...]) -> str | None:
    for name, value in headers:
        lowered = name.lower()
        if lowered in _GATEWAY_HEADERS or lowered.startswith(RESERVED_PREFIX):
            return (
                f"{name!r} may not be set here: the gateway sets {', '.join(_GATEWAY_HEADERS)} "
                f"and {RESERVED_PREFIX}* itself (use api_key or api_key_env for the key)"
            )
        if not HEADER_NAME.fullmatch(name):
            return f"{name!r} is not a valid header name"
        if any(c in value for c in "\r\n\0"):
            return f"the value of {name!r} contains a line break or NUL"
    return None


def _other_endpoint(description: str) -> str | None:
    """Any server endpoint type Twisted (or a plugin) knows, checked by Twisted's own parser:
    ``systemd:domain=INET:index=0`` needs the socket systemd handed over (``LISTEN_FDS``)."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, description)  # builds the endpoint; listens on nothing
    except Exception as exc:  # each parser raises its own way
        detail = str(exc) or type(exc).__name__
        if detail.startswith("Unknown endpoint type"):
            kind = description.partition(":")[0]
            detail = (
                f"unknown type {kind!r} (tcp, tcp6, ssl, unix, systemd, or one an installed "
                f"plugin adds; types are lower case), e.g. {_LISTEN_EXAMPLE}"
            )
        if description.startswith("systemd:") and isinstance(exc, IndexError | KeyError):
            detail = "no such socket was handed over by systemd (LISTEN_FDS / LISTEN_FDNAMES)"
        return f"not a Twisted server endpoint: {detail} (got {description!r})"
    return None


def _listen(description: str) -> str | None:
    try:
        kind, params = _parse_endpoint(description)
    except ValueError as exc:
        return f"not a Twisted server endpoint: {exc} (got {description!r})"
    if kind not in _ENDPOINT_PARAMS:
        return _other_endpoint(description)
    if kind == "unix":
        if not params.get("address"):
            return f"a unix endpoint needs a path, e.g. unix:/run/cch.sock (got {description!r})"
        return None
    port = params.get("port", "")
    if not (port.isdecimal() and port.isascii() and int(port) <= 65535):
        return (
            f"{kind} endpoint needs a port 0..65535, e.g. {_LISTEN_EXAMPLE} (got {description!r})"
        )
    backlog = params.get("backlog", "50")
    if not (backlog.isdecimal() and backlog.isascii()):
        return f"backlog must be a whole number (got {description!r})"
    return None


_RULES: dict[tuple[type, str], Callable[[Any], str | None]] = {
    (ServerConfig, "listen"): _listen,
    (ServerConfig, "metrics_listen"): _listen,
    (ServerConfig, "admin_token"): _client_key,
    (ServerConfig, "allowed_origins"): _origins,
    (ServerConfig, "allowed_hosts"): _hosts,
    (ServerConfig, "trusted_proxies"): _networks,
    (ClientKey, "name"): _not_empty,
    (ClientKey, "key"): _client_key,
    (ProviderConfig, "name"): _not_empty,
    (ProviderConfig, "base_url"): _http_url,
    (ProviderConfig, "api_key"): _not_empty,
    (ProviderConfig, "api_key_env"): _not_empty,
    (ProviderConfig, "headers"): _extra_headers,
    (ProviderConfig, "forward_headers"): _forward_headers,
    (ProviderConfig, "websocket"): _one_of("auto", "on", "off"),
    (ProviderConfig, "api"): _one_of("responses", "chat", "anthropic"),
    (ProviderConfig, "model_map"): _model_map,
    (ProviderConfig, "tls_ca"): _pem_file,
    (LimitsConfig, "websocket_compression_window_bits"): _window_bits,
    (UpstreamWebSocketConfig, "compression_window_bits"): _window_bits,
    (TunnelConfig, "mode"): _one_of("in-process", "http"),
    (TunnelConfig, "url"): _tunnel_url,
    (TunnelConfig, "secret"): _tunnel_secret,
    (TunnelConfig, "secret_env"): _not_empty,
    (UsageConfig, "database"): _database,
    (UsageConfig, "spill_file"): _not_empty,
    (PriceConfig, "model"): _not_empty,
    (KeyLimitsConfig, "models"): _model_names,
    (ClusterConfig, "redis"): _redis_url,
    (ClusterConfig, "replica"): _name_in_keys,
    (ClusterConfig, "lease_ttl"): _lease_ttl,
    (ClusterConfig, "on_redis_down"): _one_of("local", "refuse"),
    (ClusterConfig, "key_prefix"): _key_prefix,
    (TracingConfig, "enabled"): _tracing_installed,
}
# Values stored in the one form their users compare against (after the rule accepted them).
_NORMAL_FORMS: dict[tuple[type, str], Callable[[Any], Any]] = {
    (ServerConfig, "allowed_hosts"): _host_names,
    (ProviderConfig, "forward_headers"): _lower_case,
    (UsageConfig, "database"): _postgresql_scheme,
}
# Numbers must be positive (integers >= 1, durations > 0) except these.
_ANY_INT = frozenset({(ProviderConfig, "priority")})
_NON_NEGATIVE = frozenset(  # a model may be free (a local one), never paid for negatively
    {
        (PriceConfig, "input_per_mtok"),
        (PriceConfig, "cached_input_per_mtok"),
        (PriceConfig, "output_per_mtok"),
    }
)


def _problem(cls: type, key: str, kind: str, value: Any) -> str | None:
    if kind in ("int", "int | None") and (cls, key) not in _ANY_INT and value < 1:
        return f"must be >= 1 (got {value})"
    if kind in ("float", "float | None"):
        if (cls, key) in _NON_NEGATIVE:
            if not (math.isfinite(value) and value >= 0):
                return f"must be a number >= 0 (got {value})"
        elif not (math.isfinite(value) and value > 0):
            return f"must be a number > 0 (got {value})"
    rule = _RULES.get((cls, key))
    return rule(value) if rule else None


def _parse_endpoint(description: str) -> tuple[str, dict[str, str]]:
    """Split a server endpoint string the way twisted.internet.endpoints.serverFromString does
    (':' separates, the first '=' names a parameter, '\\' escapes) and bind positional parts to
    parameter names; ValueError says why Twisted would refuse it. Creates nothing."""
    parts: list[list[str]] = [[""]]  # each part is [value] or [name, value]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("it ends with a lone '\\'")
            parts[-1][-1] += escaped
        elif char == ":":
            parts.append([""])
        elif char == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += char
    head, *rest = parts
    if len(head) != 1 or not head[0]:
        raise ValueError(f"it must start with the endpoint's type, e.g. {_LISTEN_EXAMPLE}")
    if head[0] not in _ENDPOINT_PARAMS:
        return head[0], {}  # another type Twisted knows (systemd:, ...): _other_endpoint checks it
    kind, names = head[0], _ENDPOINT_PARAMS[head[0]]
    escape_hint = "write a ':' inside a value as '\\:', e.g. interface=\\:\\:1"
    positional = [part[0] for part in rest if len(part) == 1]
    if len(positional) > len(names):
        raise ValueError(f"too many ':'-separated parts ({escape_hint})")
    params = dict(zip(names, positional, strict=False))
    for part in rest:
        if len(part) == 2:
            name, value = part
            if name not in names:
                raise ValueError(f"unknown {kind} parameter {name!r} (allowed: {', '.join(names)})")
            if name in params:
                raise ValueError(f"{name} is given twice ({escape_hint})")
            params[name] = value
    return kind, params


# --- building ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """Where one table's values came from, so an error names the file key or the env var."""

    source: str
    path: str  # "server", "providers[1]"
    origins: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # key -> (source, name)

    def error(self, key: str, problem: str) -> ConfigError:
        source, name = self.origins.get(key, (self.source, f"{self.path}.{key}"))
        return ConfigError(f"{source}: {name}: {problem}")


def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _toml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    for python_type, name in names.items():
        if isinstance(value, python_type):
            return name
    if isinstance(value, list):
        odd = next((v for v in value if not isinstance(v, str)), None)
        return f"array with {_article(_toml_type(odd))} item" if odd is not None else "array"
    if isinstance(value, dict):
        odd = next((v for v in value.values() if not isinstance(v, str)), None)
        return f"table with {_article(_toml_type(odd))} value" if odd is not None else "table"
    return "date/time" if value is not None else "nothing"


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """The closest known name as a hint ending in a space, or "" when none is close."""
    guess = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {prefix}{guess[0]}? " if guess else ""


def _unknown(what: str, word: str, choices: Iterable[str]) -> str:
    """'unknown key ' or, when a known name is close, 'unknown key; did you mean x? '."""
    hint = _did_you_mean(word, choices)
    return f"unknown {what}; {hint}" if hint else f"unknown {what} "


def _check_table(cls: type, table: Mapping[str, Any], scope: _Scope) -> dict[str, Any]:
    """Type-check and rule-check one table against ``cls``; return the converted values."""
    keys = _keys_of(cls)
    for key in table:
        if key not in keys:
            lead = _unknown("key", key, keys)
            raise scope.error(key, f"{lead}(allowed: {', '.join(sorted(keys))})")
    values: dict[str, Any] = {}
    for key, (kind_name, default) in keys.items():
        if key not in table:
            if default is MISSING:
                raise scope.error(key, "is required")
            continue
        kind, raw = _KINDS[kind_name], table[key]
        if not kind.accepts(raw):
            raise scope.error(key, f"must be {_article(kind.name)} (got {_toml_type(raw)})")
        value = kind.convert(raw)
        owner = _owner(cls, key)
        problem = _problem(owner, key, kind_name, value)
        if problem:
            raise scope.error(key, problem)
        normal_form = _NORMAL_FORMS.get((owner, key))
        values[key] = normal_form(value) if normal_form else value
    return values


def _make(cls: type, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _env_var(section: str, key: str) -> str | None:
    kind = _KINDS[_keys_of(_SECTIONS[section])[key][0]]
    return f"CCH_{section}_{key}".upper() if kind.from_env else None


def _apply_env(
    tables: dict[str, dict[str, Any]],
    origins: dict[str, dict[str, tuple[str, str]]],
    env: Mapping[str, str],
) -> None:
    """Overlay CCH_<SECTION>_<KEY> variables onto the file's tables, remembering which variable
    set each key so a later validation error names it. Other CCH_* names belong to other tools
    and are ignored, but one under a section prefix is a typo and refused."""
    known: dict[str, tuple[str, str]] = {}
    for section, cls in _SECTIONS.items():
        for key in _keys_of(cls):
            if variable := _env_var(section, key):
                known[variable] = (section, key)
    if "CCH_LISTEN" in env and "CCH_SERVER_LISTEN" not in env:
        known["CCH_LISTEN"] = ("server", "listen")  # alias; the full name wins
    prefixes = tuple(f"CCH_{section.upper()}_" for section in _SECTIONS)
    for name in sorted(env):
        if name not in known:
            if name.startswith(prefixes):  # a typo, not some other tool's CCH_* variable
                prefix = next(p for p in prefixes if name.startswith(p))
                siblings = sorted(n for n in known if n.startswith(prefix))
                suffixes = [n.removeprefix(prefix) for n in siblings]
                hint = _did_you_mean(name.removeprefix(prefix), suffixes, prefix)
                raise ConfigError(
                    f"environment: {name}: not a cch setting; {hint}(known: {', '.join(siblings)})"
                )
            continue
        section, key = known[name]
        kind = _KINDS[_keys_of(_SECTIONS[section])[key][0]]
        assert kind.from_env is not None
        try:
            value = kind.from_env(env[name])
        except ValueError:
            expected = "true, false, 1 or 0" if kind.name == "boolean" else _article(kind.name)
            raise ConfigError(
                f"environment: {name}: must be {expected} (got {env[name]!r})"
            ) from None
        if value is None:
            tables[section].pop(key, None)
        else:
            tables[section][key] = value
        origins[section][key] = ("environment", name)
    _apply_upstream_websocket_toggle(tables, origins, env)


def _apply_upstream_websocket_toggle(
    tables: dict[str, dict[str, Any]],
    origins: dict[str, dict[str, tuple[str, str]]],
    env: Mapping[str, str],
) -> None:
    """The reference's tri-state CCH_UPSTREAM_WEBSOCKET: exactly true/1 or false/0, anything
    else is ignored with a warning (it must not stop a running deployment from starting)."""
    value = env.get("CCH_UPSTREAM_WEBSOCKET")
    if value is None:
        return
    if value not in ("true", "1", "false", "0"):
        log.warn("config_invalid_env", name="CCH_UPSTREAM_WEBSOCKET")
        return
    if "CCH_UPSTREAM_WEBSOCKET_ENABLED" in env:
        return  # the full name wins, as CCH_SERVER_LISTEN does over CCH_LISTEN
    tables["upstream_websocket"]["enabled"] = value in ("true", "1")
    origins["upstream_websocket"]["enabled"] = ("environment", "CCH_UPSTREAM_WEBSOCKET")


def _sections_of(raw: Mapping[str, Any], source: str) -> None:
    """Refuse unknown top-level names and tables of the wrong shape."""
    allowed = ", ".join(sorted([*_SECTIONS, *_ARRAYS]))
    for name, value in raw.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name}: must be a table, written [{name}]")
        elif name in _ARRAYS:
            if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise ConfigError(
                    f"{source}: {name}: must be an array of tables, written [[{name}]]"
                )
        elif isinstance(value, dict | list):
            lead = _unknown("table", name, [*_SECTIONS, *_ARRAYS])
            raise ConfigError(f"{source}: {name}: {lead}(allowed tables: {allowed})")
        else:
            # A setting written outside its table: name the table that has it.
            homes = [section for section, cls in _SECTIONS.items() if name in _keys_of(cls)]
            hint = f"; did you mean [{homes[0]}] {name}? " if len(homes) == 1 else " "
            raise ConfigError(f"{source}: {name}: unknown top-level key{hint}(allowed tables: {allowed})")


def _from_env(scope: _Scope, key: str, variable: str, env: Mapping[str, str]) -> str:
    value = env.get(variable)
    if not value:
        raise scope.error(key, f"environment variable {variable} is not set")
    return value


def _build(
    raw: Mapping[str, Any], source: str, env: Mapping[str, str] | None, listen: str | None
) -> Config:
    env = os.environ if env is None else env
    _sections_of(raw, source)
    tables = {name: dict(raw.get(name, {})) for name in _SECTIONS}
    origins: dict[str, dict[str, tuple[str, str]]] = {name: {} for name in _SECTIONS}
    _apply_env(tables, origins, env)
    if listen is not None:
        tables["server"]["listen"] = listen
        origins["server"]["listen"] = ("command line", "--listen")

    scopes = {name: _Scope(source, name, origins[name]) for name in _SECTIONS}
    values = {
        name: _check_table(cls, tables[name], scopes[name]) for name, cls in _SECTIONS.items()
    }
    key_defaults = _make(KeyLimitsConfig, values["key_defaults"])
    keys = _client_keys(raw.get("keys", []), source, env, key_defaults)
    providers = _providers(raw.get("providers", []), source, env)
    prices = _prices(raw.get("prices", []), source)
    if not prices:
        _refuse_budget_without_prices(key_defaults, scopes["key_defaults"], raw.get("keys", []))
    tunnel = values["tunnel"]
    tunnel["secret"] = _resolve_secret(tunnel, scopes["tunnel"], env)
    named_replica = values["server"].get("replica")
    if not named_replica:
        values["server"]["replica"] = socket.gethostname()
    if not values["cluster"].get("replica"):
        # One name per replica when the operator gave one (ledger rows and leases agree); the
        # host name alone is not enough for leases, since several replicas may share a host.
        values["cluster"]["replica"] = named_replica or f"{socket.gethostname()}-{os.getpid()}"

    server = _make(ServerConfig, values["server"])
    kind = _parse_endpoint(server.listen)[0]
    if not keys and kind not in _ENDPOINT_PARAMS:
        raise scopes["server"].error(
            "listen",
            f"the address of a {kind}: endpoint is known only once it listens, so without "
            f"[[keys]] it is refused (anyone who can reach it could use your providers); add "
            f"[[keys]] entries with a name and key, or listen on loopback only, e.g. "
            f"{_LISTEN_EXAMPLE} or unix:/run/cch/cch.sock",
        )
    if not keys and not is_loopback_endpoint(server.listen):
        port = _parse_endpoint(server.listen)[1].get("port", "8080")
        raise scopes["server"].error(
            "listen",
            f"binding {server.listen!r} (not loopback only) without [[keys]] is refused, since "
            f"anyone who can reach it could use your providers; add [[keys]] entries with a name "
            f"and key, or bind loopback only, e.g. tcp:{port}:interface=127.0.0.1",
        )
    if server.metrics_listen and not server.admin_token:
        if not is_loopback_endpoint(server.metrics_listen):
            port = _parse_endpoint(server.metrics_listen)[1].get("port", "9100")
            raise scopes["server"].error(
                "metrics_listen",
                f"{server.metrics_listen!r} is not loopback only, which needs server.admin_token "
                f"set; or bind loopback only, e.g. tcp:{port}:interface=127.0.0.1",
            )
    tunnel_config = _make(TunnelConfig, tunnel)
    if tunnel_config.mode == "http" and tunnel_config.url is None:
        listener = _parse_endpoint(server.listen)[0]
        if listener not in ("tcp", "tcp6"):
            raise scopes["tunnel"].error(
                "mode",
                f'"http" without tunnel.url POSTs turns over plain http:// to this gateway\'s own '
                f"listener, which must then be tcp: or tcp6: (server.listen is {server.listen!r}); "
                'set tunnel.url, or use tunnel.mode = "in-process"',
            )
    return Config(
        server=server,
        keys=keys,
        providers=providers,
        limits=_make(LimitsConfig, values["limits"]),
        breaker=_make(BreakerConfig, values["breaker"]),
        tunnel=tunnel_config,
        upstream_websocket=_make(UpstreamWebSocketConfig, values["upstream_websocket"]),
        continuity=_make(ContinuityConfig, values["continuity"]),
        usage=_make(UsageConfig, values["usage"]),
        prices=prices,
        key_defaults=key_defaults,
        cluster=_make(ClusterConfig, values["cluster"]),
        tracing=_make(TracingConfig, values["tracing"]),
        source=source,
    )


def _refuse_duplicate(
    items: list[Any], attribute: str, section: str, source: str, show: bool = True
) -> None:
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        value = getattr(item, attribute)
        if value in seen:
            shown = f" ({value!r})" if show else ""  # client keys are never shown
            raise ConfigError(
                f"{source}: {section}[{index}].{attribute}: same {attribute} as "
                f"{section}[{seen[value]}]{shown}; each must be unique"
            )
        seen[value] = index


def _client_keys(
    tables: list[dict[str, Any]],
    source: str,
    env: Mapping[str, str],
    defaults: KeyLimitsConfig,
) -> tuple[ClientKey, ...]:
    """Each [[keys]] table, its limit fields laid over [key_defaults] one by one."""
    own_limits = {f.name for f in fields(KeyLimitsConfig)}
    keys = []
    for index, table in enumerate(tables):
        scope = _Scope(source, f"keys[{index}]")
        variable = table.get("key_env") if isinstance(table, dict) else None
        if variable is not None:
            if "key" in table:
                raise scope.error("key_env", "set either key or key_env, not both")
            if not isinstance(variable, str) or not variable:
                raise scope.error(
                    "key_env", f"must be a non-empty string (got {_toml_type(variable)})"
                )
            # The key lives in the environment (a Kubernetes Secret, a systemd credential).
            table = dict(table, key=_from_env(scope, "key_env", variable, env))
            named = (source, f"keys[{index}].key_env ({variable})")
            scope = _Scope(source, scope.path, {"key": named})
        values = _check_table(ClientKey, table, scope)
        limits = replace(defaults, **{k: v for k, v in values.items() if k in own_limits})
        keys.append(_make(ClientKey, {**values, "limits": limits}))
    _refuse_duplicate(keys, "name", "keys", source)
    _refuse_duplicate(keys, "key", "keys", source, show=False)
    return tuple(keys)


def _providers(
    tables: list[dict[str, Any]], source: str, env: Mapping[str, str]
) -> tuple[ProviderConfig, ...]:
    providers = []
    for index, table in enumerate(tables):
        scope = _Scope(source, f"providers[{index}]")
        values = _check_table(ProviderConfig, table, scope)
        variable = values.get("api_key_env")
        if variable is not None:
            if "api_key" in values:
                raise scope.error("api_key_env", "set either api_key or api_key_env, not both")
            values["api_key"] = _from_env(scope, "api_key_env", variable, env)
        if values.get("api", "responses") != "responses" and values.get("websocket") == "on":
            raise scope.error(
                "websocket",
                f'"on" needs api = "responses": a {values["api"]} provider is reached over HTTP only '
                '(leave websocket unset or "off")',
            )
        if values.get("api", "responses") != "responses":
            values["websocket"] = "off"  # the upstream WebSocket speaks the Responses API only
        providers.append(_make(ProviderConfig, values))
    _refuse_duplicate(providers, "name", "providers", source)
    return tuple(providers)


def _prices(tables: list[dict[str, Any]], source: str) -> tuple[PriceConfig, ...]:
    prices = [
        _make(PriceConfig, _check_table(PriceConfig, table, _Scope(source, f"prices[{index}]")))
        for index, table in enumerate(tables)
    ]
    _refuse_duplicate(prices, "model", "prices", source)
    return tuple(prices)


def _refuse_budget_without_prices(
    defaults: KeyLimitsConfig, scope: _Scope, key_tables: list[dict[str, Any]]
) -> None:
    """A budget counts spend, and spend is priced by [[prices]]: without any, every turn would
    cost nothing and the budget would silently never bind."""
    problem = (
        "needs [[prices]] to count spend in USD; add a [[prices]] table (model, input_per_mtok, "
        "output_per_mtok) for each model the key uses, or remove budget_per_month"
    )
    if defaults.budget_per_month is not None:
        raise scope.error("budget_per_month", problem)
    for index, table in enumerate(key_tables):
        if "budget_per_month" in table:
            raise _Scope(scope.source, f"keys[{index}]").error("budget_per_month", problem)


def _resolve_secret(values: Mapping[str, Any], scope: _Scope, env: Mapping[str, str]) -> str:
    """tunnel.secret, else the variable named by tunnel.secret_env (which must be set), else
    CCH_RESPONSES_WS_INTERNAL_SECRET, else a fresh random secret for this process. A secret
    from the environment is held to tunnel.secret's rule (_tunnel_secret)."""
    if values.get("secret"):
        return str(values["secret"])  # checked with the table
    variable = values.get("secret_env")
    if variable is not None:
        secret = _from_env(scope, "secret_env", variable, env)
        if problem := _tunnel_secret(secret):
            raise scope.error("secret_env", f"the secret in {variable} {problem}")
        return secret
    secret = env.get(SECRET_ENV)
    if not secret:
        return new_secret()
    if problem := _tunnel_secret(secret):
        raise ConfigError(f"environment: {SECRET_ENV}: {problem}")
    return secret
