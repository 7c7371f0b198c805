"""host.json and local.settings.json, read the way the Functions host and Core Tools read them.

Only the parts the development host acts on are interpreted: `extensions.http.routePrefix` and
`extensions.queues`. Everything else in host.json (logging, extensionBundle, functionTimeout, ...) is
accepted and ignored, so the project's real host.json works unchanged.

The real host binds host.json through .NET configuration, which makes two things worth copying:
keys are case-insensitive, and any value can be overridden by an app setting named
`AzureFunctionsJobHost__<path>__<to>__<key>` (for example
`AzureFunctionsJobHost__extensions__queues__maxDequeueCount=3`). The tests use that override form,
because `devhost.services.start_devhost` passes an environment but no extra command-line flags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OVERRIDE_PREFIX = "azurefunctionsjobhost__"

# .NET TimeSpan "c" form, without the sign: [d.]hh:mm[:ss[.fffffff]].
_TIMESPAN = re.compile(
    r"^(?:(?P<d>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2})(?::(?P<s>\d{1,2})(?:\.(?P<f>\d{1,7}))?)?$"
)
_SETTING_REF = re.compile(r"%([^%]+)%")
_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")


class ConfigError(Exception):
    """A configuration problem the host cannot start with; the message names the setting."""


def parse_timespan(value: object, *, setting: str) -> float:
    """Seconds from a host.json duration.

    Accepted: a TimeSpan string `[d.]hh:mm[:ss[.fffffff]]` (what host.json uses since Functions v2, e.g.
    "00:00:02"), or a JSON number of milliseconds (the Functions v1 form). A bare number written as a
    string ("2000") is refused: .NET's TimeSpan.Parse would read it as 2000 *days*, so accepting it either
    way would make devhost disagree with one of the two real readings.
    """
    if isinstance(value, bool):
        raise ConfigError(f'{setting}: expected a duration like "00:00:02", got {value!r}')
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{setting}: a duration cannot be negative ({value!r})")
        return float(value) / 1000.0
    if not isinstance(value, str):
        raise ConfigError(f'{setting}: expected a duration like "00:00:02", got {value!r}')
    text = value.strip()
    if text.isdigit():
        raise ConfigError(
            f"{setting}: {value!r} is ambiguous (.NET reads a bare number as days); "
            'write a TimeSpan like "00:00:02" or a JSON number of milliseconds'
        )
    match = _TIMESPAN.match(text)
    if match is None:
        raise ConfigError(f'{setting}: {value!r} is not a duration like "00:00:02" or "1.00:00:00"')
    hours, minutes, seconds = int(match["h"]), int(match["m"]), int(match["s"] or 0)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ConfigError(f"{setting}: {value!r} has an hour, minute or second out of range")
    fraction = float(f"0.{match['f']}") if match["f"] else 0.0
    return int(match["d"] or 0) * 86400.0 + hours * 3600.0 + minutes * 60.0 + seconds + fraction


def _int(value: object, *, setting: str, minimum: int, maximum: int | None = None) -> int:
    """An integer setting; strings of digits count, because app-setting overrides are always strings."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{setting}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{setting}: expected an integer, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{setting}: {number} is outside {bounds}")
    return number


def _folded(section: object, *, setting: str) -> dict[str, Any]:
    """A JSON object with lower-cased keys (.NET configuration keys are case-insensitive)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{setting}: expected an object, got {section!r}")
    return {str(key).lower(): value for key, value in section.items()}


@dataclass(frozen=True)
class QueueOptions:
    """`extensions.queues` with the real host's defaults (Storage Queues extension 5.x)."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @classmethod
    def from_section(cls, section: object) -> QueueOptions:
        raw = _folded(section, setting="extensions.queues")
        where = "extensions.queues."
        batch_size = _int(raw.get("batchsize", 16), setting=where + "batchSize", minimum=1, maximum=32)
        threshold = raw.get("newbatchthreshold")
        encoding = str(raw.get("messageencoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise ConfigError(f'{where}messageEncoding: expected "base64" or "none", got {encoding!r}')
        polling = parse_timespan(raw.get("maxpollinginterval", 60000), setting=where + "maxPollingInterval")
        if polling < 0.1:
            raise ConfigError(f"{where}maxPollingInterval: must be at least 00:00:00.100 (host minimum)")
        return cls(
            batch_size=batch_size,
            new_batch_threshold=(
                batch_size // 2
                if threshold is None
                else _int(threshold, setting=where + "newBatchThreshold", minimum=0)
            ),
            max_polling_interval=polling,
            visibility_timeout=parse_timespan(
                raw.get("visibilitytimeout", 0), setting=where + "visibilityTimeout"
            ),
            max_dequeue_count=_int(
                raw.get("maxdequeuecount", 5), setting=where + "maxDequeueCount", minimum=1
            ),
            message_encoding=encoding,
        )


@dataclass(frozen=True)
class HostConfig:
    """What the development host takes from host.json."""

    route_prefix: str = "api"
    queues: QueueOptions = field(default_factory=QueueOptions)


def _merge_overrides(document: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply `AzureFunctionsJobHost__a__b=value` settings over the (key-folded) host.json tree."""
    tree: dict[str, Any] = _fold_tree(document)
    for name, value in environ.items():
        if not name.lower().startswith(OVERRIDE_PREFIX):
            continue
        path = [part.lower() for part in name[len(OVERRIDE_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return tree


def _fold_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key).lower(): _fold_tree(item) for key, item in value.items()}
    return value


def load_host_json(path: Path | None, environ: Mapping[str, str]) -> HostConfig:
    """Read host.json (None means all defaults), then apply the app-setting overrides."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        document = loaded
    tree = _merge_overrides(document, environ)
    extensions = _folded(tree.get("extensions"), setting="extensions")
    http = _folded(extensions.get("http"), setting="extensions.http")
    prefix = http.get("routeprefix", "api")
    if not isinstance(prefix, str):
        raise ConfigError(f"extensions.http.routePrefix: expected a string, got {prefix!r}")
    queues = QueueOptions.from_section(extensions.get("queues"))
    return HostConfig(route_prefix=prefix.strip("/"), queues=queues)


@dataclass(frozen=True)
class LocalSettings:
    """What was taken from local.settings.json."""

    applied: tuple[str, ...] = ()
    kept_from_environment: tuple[str, ...] = ()
    http_port: int | None = None


def load_local_settings(path: Path, environ: MutableMapping[str, str]) -> LocalSettings:
    """Copy `Values` into the environment, as Core Tools do; a variable already set in the environment wins.

    Letting the environment win means a test or a shell can override one setting without editing the
    file. Values must be strings (the host's app settings are strings; a number here is almost always
    a quoting mistake that would otherwise be read differently by Core Tools).
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if document.get("IsEncrypted"):
        raise ConfigError(f"{path}: encrypted settings (IsEncrypted: true) are not supported by devhost")
    values = document.get("Values", {})
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: Values must be an object")
    applied: list[str] = []
    kept: list[str] = []
    for name, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: Values.{name} must be a string, got {value!r}")
        if name in environ:
            kept.append(name)
        else:
            environ[name] = value
            applied.append(name)
    host = document.get("Host") or {}
    port = host.get("LocalHttpPort") if isinstance(host, dict) else None
    http_port = None if port is None else _int(port, setting=f"{path}: Host.LocalHttpPort", minimum=1)
    return LocalSettings(tuple(applied), tuple(kept), http_port)


def resolve_setting_refs(value: str, environ: Mapping[str, str], *, where: str) -> str:
    """Replace each `%NAME%` with the app setting NAME, as the host does for binding expressions."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{where}: app setting {name!r} (referenced as %{name}%) is not set")
        return environ[name]

    return _SETTING_REF.sub(lookup, value)


def validate_queue_name(name: str, *, where: str) -> str:
    """Storage's rule: 3-63 characters, lower-case letters, digits and single inner hyphens."""
    if not _QUEUE_NAME.match(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid queue name "
            "(3-63 lower-case letters, digits and single hyphens, starting and ending alphanumeric)"
        )
    return name


def storage_connection_string(connection: str | None, environ: Mapping[str, str], *, where: str) -> str:
    """The connection string a trigger's `connection` names (default AzureWebJobsStorage).

    Like the host, `X` is looked up as the setting `X` and then `AzureWebJobsX`. The identity-based form
    (`X__queueServiceUri`, `X__accountName`, ...) is refused with a clear message: devhost does not
    implement it, and silently falling back to another account would be worse.
    """
    name = (connection or "AzureWebJobsStorage").strip()
    for candidate in (name, f"AzureWebJobs{name}"):
        value = environ.get(candidate, "").strip()
        if value:
            return value
    prefix = f"{name.lower()}__"
    if any(key.lower().startswith(prefix) for key in environ):
        raise ConfigError(
            f"{where}: connection {name!r} is identity-based ({name}__...), which devhost does not "
            f"support; set {name} to a connection string (e.g. Azurite's) for local runs"
        )
    raise ConfigError(f"{where}: connection setting {name!r} is not set")
