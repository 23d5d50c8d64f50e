"""Settings: every configurable value, read from the environment once at start-up (see README,
"Configuration"); a value that cannot be used is a SettingsError naming the variable."""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import msgspec

from store.models import ApprovalRule


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def _flag(raw: str) -> bool:
    return raw.strip().lower() in ("true", "1", "yes")


def _metrics_flag(raw: str) -> bool:
    enabled = _flag(raw)
    if enabled and importlib.util.find_spec("prometheus_client") is None:
        raise ValueError("needs prometheus_client: pip install 'agent-coordinator[metrics]'")
    return enabled


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0-65535)")
    return value


def _buffer_bytes(raw: str) -> int:
    value = int(raw)
    if value < 64 * 1024:
        raise ValueError("must be at least 65536 (64 KiB)")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be zero or a positive number")
    return value


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _recovery_mode(raw: str) -> str:
    # Unknown values act as the default, like the reference.
    return raw if raw in ("stale", "all", "none") else "stale"


def _json_depth(raw: str) -> int:
    value = int(raw)
    # Deeper documents would trip msgspec's recursion limit or SQLite's JSON depth (1000).
    if not 1 <= value <= 500:
        raise ValueError("must be between 1 and 500")
    return value


def _auth0_domain(raw: str) -> str:
    domain = raw.strip()
    if "/" in domain or ":" in domain:
        raise ValueError("must be a host name such as tenant.eu.auth0.com, without https:// or /")
    return domain


def _issuer_url(raw: str) -> str:
    url = raw.strip()
    if not url:  # unset, as an empty AUTH0_DOMAIN is
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be the issuer's URL, as in its tokens' iss claim (https://...)")
    return url


def _approval_rules(raw: str) -> tuple[ApprovalRule, ...]:
    try:
        return tuple(msgspec.json.decode(raw, type=list[ApprovalRule]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f'must be a JSON list of rules like {{"tool": "Bash", "agent": "*", "project_dir": "/srv/*"}}: {exc}') from None


def _approval_rules_file(raw: str) -> tuple[ApprovalRule, ...]:
    try:
        text = Path(raw).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the rules: {exc}") from None
    return _approval_rules(text)


def _approval_decision(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("allow", "deny"):
        raise ValueError("must be allow or deny")
    return value


def _token(raw: str) -> str:
    token = raw.strip()
    if not token:
        raise ValueError("must not be empty (unset it to turn authentication off)")
    return token


def _token_file(raw: str) -> str:
    try:
        text = Path(raw).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token: {exc}") from None
    return _token(text)


def redact_url(url: str) -> str:
    """A database URL as it may be shown: its password (in the user part or a `password`
    parameter) replaced by `***`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed)"
    shown = url
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        shown = shown.replace(f"//{userinfo}@", f"//{userinfo.partition(':')[0]}:***@", 1)
    if parts.query:
        query = "&".join(
            "password=***" if pair.split("=", 1)[0].lower() == "password" else pair for pair in parts.query.split("&")
        )
        shown = shown.replace("?" + parts.query, "?" + query, 1)
    return shown


def parse_database_url(raw: str) -> str:
    url = raw.strip()
    if urllib.parse.urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a PostgreSQL URL: postgresql://user@host:port/database")
    return url


def _database_url_file(raw: str) -> str:
    try:
        text = Path(raw).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the URL: {exc}") from None
    return parse_database_url(text)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once; see README for each variable."""

    host: str = "0.0.0.0"
    port: int = 8765
    project_dir: Path = field(default_factory=Path.cwd)
    agents_dir_override: Path | None = None
    debug_logging: bool = False
    log_format: str = "text"
    cors_origins: tuple[str, ...] = ("*",)
    run_recovery_mode: str = "stale"
    runner_poll_timeout: float = 30.0
    runner_heartbeat_interval: float = 60.0
    runner_stale_threshold: float = 120.0
    runner_remove_threshold: float = 600.0
    runner_lifecycle_interval: float = 30.0
    run_no_match_timeout: float = 300.0
    run_claim_timeout: float = 60.0  # several processes on PostgreSQL only
    auth_enabled: bool = False
    auth0_domain: str = ""
    auth0_audience: str = ""
    oidc_issuer: str = ""
    oidc_audience: str = ""
    jwks_min_fetch_interval: float = 30.0
    broadcast_queue_size: int = 1000
    subscriber_buffer_bytes: int = 4 * 1024 * 1024
    max_subscribers: int = 1000
    sse_heartbeat_interval: float = 30.0
    max_body_bytes: int = 1024 * 1024
    retention_days: float = 0.0  # 0: keep forever
    retention_interval: float = 3600.0
    metrics_enabled: bool = False
    max_json_depth: int = 64
    read_cache_mb: float = 32.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    keep_alive_timeout: float = 5.0
    max_connections: int = 2048
    api_token: str | None = None
    database_url: str | None = None  # None: the SQLite file in the data dir
    database_max_mb: float = 0.0  # 0: no cap
    run_stop_timeout: float = 300.0
    approval_rules: tuple[ApprovalRule, ...] = ()  # none: no hook waits for a person
    approval_timeout: float = 300.0  # below Claude Code's default hook timeout (600 s)
    approval_timeout_decision: str = "deny"

    @property
    def data_dir(self) -> Path:
        return self.project_dir / ".agent-orchestrator"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "observability.db"

    @property
    def agents_dir(self) -> Path:
        return self.agents_dir_override or self.data_dir / "agents"

    @property
    def jwt_issuer(self) -> str:
        """The tokens' `iss`: Auth0's is its domain as an https URL, with the slash."""
        return f"https://{self.auth0_domain}/" if self.auth0_domain else self.oidc_issuer

    @property
    def jwks_uri(self) -> str | None:
        """Auth0's keys have a fixed address; other issuers name theirs in their discovery document."""
        return f"https://{self.auth0_domain}/.well-known/jwks.json" if self.auth0_domain else None

    @property
    def jwt_audience(self) -> str:
        return self.oidc_audience or self.auth0_audience

    @property
    def database_name(self) -> str:
        """The database as a message names it: the SQLite file, or the variable and the URL
        without its password."""
        if self.database_url is None:
            return str(self.db_path)
        return f"COORDINATOR_DATABASE_URL ({redact_url(self.database_url)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        for one, other in (("COORDINATOR_API_TOKEN", "COORDINATOR_API_TOKEN_FILE"),
                           ("COORDINATOR_DATABASE_URL", "COORDINATOR_DATABASE_URL_FILE"),
                           ("APPROVAL_RULES", "APPROVAL_RULES_FILE")):
            if one in env and other in env:
                raise SettingsError(f"{one} and {other} are both set: use one")
        values: dict[str, object] = {}
        for var, name, parse in _ENV:
            raw = env.get(var)
            if raw is None:
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                shown = redact_url(raw) if var == "COORDINATOR_DATABASE_URL" else raw
                raise SettingsError(f"{var}={shown!r}: {exc}") from None
        settings = cls(**values)
        if settings.auth_enabled:
            _check_jwt_settings(settings)
        if settings.database_url is not None:
            _check_postgres_settings(settings)
        return settings


def _check_jwt_settings(settings: Settings) -> None:
    # Exactly one of each pair: with two, one would be silently ignored.
    issuers = bool(settings.auth0_domain) + bool(settings.oidc_issuer)
    audiences = bool(settings.auth0_audience) + bool(settings.oidc_audience)
    if issuers != 1 or audiences != 1:
        raise SettingsError(
            "AUTH_ENABLED=true needs the issuer (AUTH0_DOMAIN or OIDC_ISSUER, not both) and the audience"
            " (AUTH0_AUDIENCE or OIDC_AUDIENCE, not both); unset AUTH_ENABLED to check only COORDINATOR_API_TOKEN"
        )
    if importlib.util.find_spec("jwt") is None or importlib.util.find_spec("cryptography") is None:
        raise SettingsError("AUTH_ENABLED=true needs PyJWT and cryptography: pip install 'agent-coordinator[oidc]'")


def _check_postgres_settings(settings: Settings) -> None:
    if settings.database_max_mb:
        raise SettingsError(
            "DATABASE_MAX_MB caps the SQLite file; with COORDINATOR_DATABASE_URL unset it"
            " (PostgreSQL's own disk space limits apply)"
        )
    if importlib.util.find_spec("psycopg") is None or importlib.util.find_spec("psycopg_pool") is None:
        raise SettingsError(
            "COORDINATOR_DATABASE_URL needs psycopg and its pool: pip install 'agent-coordinator[postgres]'"
        )


_ENV: list[tuple[str, str, Callable[[str], object]]] = [
    ("COORDINATOR_HOST", "host", str),
    ("COORDINATOR_PORT", "port", _port),
    ("AGENT_ORCHESTRATOR_PROJECT_DIR", "project_dir", Path),
    ("AGENT_ORCHESTRATOR_AGENTS_DIR", "agents_dir_override", Path),
    ("DEBUG_LOGGING", "debug_logging", _flag),
    ("LOG_FORMAT", "log_format", _log_format),
    ("CORS_ORIGINS", "cors_origins", lambda raw: tuple(raw.split(","))),
    ("RUN_RECOVERY_MODE", "run_recovery_mode", _recovery_mode),
    ("RUNNER_POLL_TIMEOUT", "runner_poll_timeout", _positive_float),
    ("RUNNER_HEARTBEAT_INTERVAL", "runner_heartbeat_interval", _positive_float),
    ("RUNNER_STALE_THRESHOLD", "runner_stale_threshold", _positive_float),
    ("RUNNER_REMOVE_THRESHOLD", "runner_remove_threshold", _positive_float),
    ("RUNNER_LIFECYCLE_INTERVAL", "runner_lifecycle_interval", _positive_float),
    ("RUN_NO_MATCH_TIMEOUT", "run_no_match_timeout", _positive_float),
    ("RUN_CLAIM_TIMEOUT", "run_claim_timeout", _positive_float),
    ("AUTH_ENABLED", "auth_enabled", _flag),
    ("AUTH0_DOMAIN", "auth0_domain", _auth0_domain),
    ("AUTH0_AUDIENCE", "auth0_audience", str.strip),
    ("OIDC_ISSUER", "oidc_issuer", _issuer_url),
    ("OIDC_AUDIENCE", "oidc_audience", str.strip),
    ("JWKS_MIN_FETCH_INTERVAL", "jwks_min_fetch_interval", _non_negative_float),
    ("BROADCAST_QUEUE_SIZE", "broadcast_queue_size", _positive_int),
    ("SUBSCRIBER_BUFFER_BYTES", "subscriber_buffer_bytes", _buffer_bytes),
    ("MAX_SUBSCRIBERS", "max_subscribers", _positive_int),
    ("SSE_HEARTBEAT_INTERVAL", "sse_heartbeat_interval", _positive_float),
    ("MAX_BODY_BYTES", "max_body_bytes", _positive_int),
    ("RETENTION_DAYS", "retention_days", _non_negative_float),
    ("RETENTION_INTERVAL", "retention_interval", _positive_float),
    ("METRICS_ENABLED", "metrics_enabled", _metrics_flag),
    ("MAX_JSON_DEPTH", "max_json_depth", _json_depth),
    ("READ_CACHE_MB", "read_cache_mb", _non_negative_float),
    ("BODY_TIMEOUT", "body_timeout", _positive_float),
    ("HEADER_TIMEOUT", "header_timeout", _positive_float),
    ("MAX_HEADER_BYTES", "max_header_bytes", _positive_int),
    ("KEEP_ALIVE_TIMEOUT", "keep_alive_timeout", _positive_float),
    ("MAX_CONNECTIONS", "max_connections", _positive_int),
    ("COORDINATOR_API_TOKEN", "api_token", _token),
    ("COORDINATOR_API_TOKEN_FILE", "api_token", _token_file),
    ("COORDINATOR_DATABASE_URL", "database_url", parse_database_url),
    ("COORDINATOR_DATABASE_URL_FILE", "database_url", _database_url_file),
    ("DATABASE_MAX_MB", "database_max_mb", _non_negative_float),
    ("RUN_STOP_TIMEOUT", "run_stop_timeout", _positive_float),
    ("APPROVAL_RULES", "approval_rules", _approval_rules),
    ("APPROVAL_RULES_FILE", "approval_rules", _approval_rules_file),
    ("APPROVAL_TIMEOUT", "approval_timeout", _positive_float),
    ("APPROVAL_TIMEOUT_DECISION", "approval_timeout_decision", _approval_decision),
]
