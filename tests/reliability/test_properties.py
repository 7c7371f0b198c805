"""Property-based tests of validation, end to end: generated batchUpdate bodies against a real host.

The properties (issue 6, part 3), for every generated body, each POSTed with its own Idempotency-Key:

- alertgate never answers 500 (nor anything but 200, 202 or 400);
- it answers 400 exactly when the body breaks a rule, and then nothing of it reaches MDE;
- it accepts exactly the valid bodies, and MDE receives each of them once, in canonical form: MDE's
  exact field names in MDE's order, canonical enum values, duplicates removed in first-seen order.

Validity and the canonical form are computed here, independently, by `expected_body` from the README's
rules (only the enum *lists* come from shared.validation; calling its validator would make the test
circular). Field names and enum values are matched case-insensitively in ASCII (A-Z against a-z), the
documented behaviour: the generator includes Unicode characters whose lowercase mapping is unusual (the
Kelvin sign lowercases to `k` in Unicode, the long s and dotted capital I do not lowercase to ASCII), and
each of them must be refused as a look-alike, not taken for the name or value it resembles.

How the bodies are produced and sent: hypothesis *generates* the bodies (a `@given` function that only
collects them, with `max_examples` from ALERTGATE_PROPERTY_EXAMPLES: 10,000 in the whole suite, 200 in
the README's test command, derandomized there so CI sees the same bodies every run), then they are
POSTed 8 at a time, then the emulator's record is compared with the expectation. Sending inside the
hypothesis loop would be sequential (hypothesis runs one example at a time): about four times slower,
for shrinking that a failure report does not need (it prints the offending body as sent). Generation
stays within hypothesis' size limits by drawing a short pattern and a length and building long strings
from them, so lengths right at the limits (256, 8,000 code points; astral characters count once) are
exercised without drawing thousands of characters.

Every valid-looking alert id is made unique per body at rendering time (its 18 digits carry the body's
number), so every MDE call maps to exactly one body and no two bodies wait behind each other in
per-alert order. The host has its own emulator process (limits 100000/1) and raised limits (2000/1,
no margin), so the budget never interferes; MAX_ALERTS_PER_REQUEST is 4 so that the limit on distinct
ids is crossed by small lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from devhost.services import Service, start_devhost, start_emulators
from emulators.control import EmulatorControl
from shared.validation import (
    CLASSIFICATION_ALIASES,
    CLASSIFICATION_VALUES,
    DETERMINATION_ALIASES,
    DETERMINATION_VALUES,
    RETIRED_DETERMINATIONS,
    STATUS_VALUES,
)
from tests.integration.helpers import eventually
from tests.reliability.conftest import app_env, full_suite

EXAMPLES = int(os.environ.get("ALERTGATE_PROPERTY_EXAMPLES", "10000" if full_suite() else "200"))
CONCURRENCY = 8
MAX_ALERTS = 4  # the host's MAX_ALERTS_PER_REQUEST
ASSIGNED_TO_MAX = 256
COMMENT_MAX = 8000
BATCH = "/api/alerts/batchUpdate"

# --- the rules, written out independently ------------------------------------------------------------

FIELDS = ("alertIds", "status", "assignedTo", "classification", "determination", "comment")
UPDATE_FIELDS = FIELDS[1:]
ENUMS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "status": (STATUS_VALUES, {}),
    "classification": (CLASSIFICATION_VALUES, CLASSIFICATION_ALIASES),
    "determination": (DETERMINATION_VALUES, DETERMINATION_ALIASES),
}
ASCII_DIGITS = frozenset("0123456789")
ASCII_LOWER = frozenset(string.ascii_lowercase)
COMMENT_CONTROLS = frozenset("\n\r\t")
TEXT_RULES = {"assignedTo": (ASSIGNED_TO_MAX, frozenset[str]()), "comment": (COMMENT_MAX, COMMENT_CONTROLS)}


def is_control(char: str) -> bool:
    """Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F (DEL and C1 included)."""
    return ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F


def is_surrogate(char: str) -> bool:
    return 0xD800 <= ord(char) <= 0xDFFF


def is_mde_alert_id(value: str) -> bool:
    """`^(?:[a-z]{2})?\\d{18}_-?\\d{1,20}$` as a full match with ASCII digits, without a regex."""
    head, underscore, tail = value.partition("_")
    if not underscore:
        return False
    if len(head) == 20:
        prefix, digits = head[:2], head[2:]
        if not set(prefix) <= ASCII_LOWER:
            return False
    elif len(head) == 18:
        digits = head
    else:
        return False
    tail = tail.removeprefix("-")
    return set(digits) <= ASCII_DIGITS and 1 <= len(tail) <= 20 and set(tail) <= ASCII_DIGITS


def ascii_lowered(text: str) -> str:
    """A-Z to a-z, nothing else (the test's own reading of "case-insensitive" for MDE's ASCII names)."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def enum_value(name: str, value: str) -> str | None:
    """The canonical value a given one stands for (case-insensitive, aliases mapped), else None."""
    values, aliases = ENUMS[name]
    lowered = ascii_lowered(value)
    for candidate in values:
        if candidate.lower() == lowered:
            return candidate
    for alias, canonical in aliases.items():
        if alias.lower() == lowered:
            return canonical
    return None


def text_ok(value: str, maximum: int, allowed_controls: frozenset[str]) -> bool:
    if not 1 <= len(value) <= maximum:
        return False
    return not any(is_surrogate(c) or (is_control(c) and c not in allowed_controls) for c in value)


def expected_body(document: Any, max_alerts: int = MAX_ALERTS) -> dict[str, Any] | None:
    """What MDE must receive for this JSON document, or None when alertgate must answer 400."""
    if not isinstance(document, Pairs):
        return None
    by_lower = {name.lower(): name for name in FIELDS}
    given: dict[str, Any] = {}
    for key, value in document.pairs:
        name = by_lower.get(ascii_lowered(key))
        if name is None or name in given:  # unknown, or repeated (exactly or in another casing)
            return None
        given[name] = value
    ids = given.get("alertIds")
    if not isinstance(ids, list) or not ids:
        return None
    if not all(isinstance(i, str) and is_mde_alert_id(i) for i in ids):
        return None
    distinct = list(dict.fromkeys(ids))
    if len(distinct) > max_alerts or not any(name in given for name in UPDATE_FIELDS):
        return None
    body: dict[str, Any] = {"alertIds": distinct}
    for name in UPDATE_FIELDS:
        if name not in given:
            continue
        value = given[name]
        if not isinstance(value, str):
            return None
        if name in ENUMS:
            canonical = enum_value(name, value)
            if canonical is None:
                return None
            body[name] = canonical
        else:
            maximum, controls = TEXT_RULES[name]
            if not text_ok(value, maximum, controls):
                return None
            body[name] = value
    return body


# --- what is generated -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertId:
    """An alert id's shape; its 18 digits are filled in when the body is rendered (unique per body).

    `slot` names the id within its body (two entries with the same slot are the same id: a duplicate);
    `breakage` turns it into a near miss that must be refused."""

    slot: int
    prefix: str
    negative: bool
    suffix: str
    breakage: str | None = None


BREAKAGES: dict[str, Callable[[str, str, str], str]] = {  # (prefix, 18 digits, "_" suffix) → id
    "fullwidth-digit": lambda p, d, s: p + chr(0xFF10 + int(d[0])) + d[1:] + s,
    "arabic-indic-digit": lambda p, d, s: p + d[:5] + chr(0x0660 + int(d[5])) + d[6:] + s,
    "devanagari-suffix": lambda p, d, s: p + d + s[:-1] + chr(0x0966 + int(s[-1])),
    "17-digits": lambda p, d, s: p + d[1:] + s,
    "19-digits": lambda p, d, s: p + d + "7" + s,
    "upper-prefix": lambda p, d, s: (p.upper() or "DA") + d + s,
    "three-letter-prefix": lambda p, d, s: "abc" + d + s,
    "no-underscore": lambda p, d, s: p + d + s[1:],
    "suffix-21-digits": lambda p, d, s: p + d + "_" + "1" * 21,
    "empty-suffix": lambda p, d, s: p + d + "_",
    "trailing-newline": lambda p, d, s: p + d + s + "\n",
    "leading-space": lambda p, d, s: " " + p + d + s,
    "plus-sign": lambda p, d, s: p + d + "_+" + s.lstrip("_-"),
    "double-minus": lambda p, d, s: p + d + "_--" + s.lstrip("_-"),
    "nul-inside": lambda p, d, s: p + d[:9] + "\x00" + d[9:] + s,
}


def render_id(alert_id: AlertId, body_number: int) -> str:
    digits = f"{6370 * 10**14 + body_number * 100 + alert_id.slot:018d}"
    suffix = "_" + ("-" if alert_id.negative else "") + alert_id.suffix
    if alert_id.breakage is None:
        return alert_id.prefix + digits + suffix
    return BREAKAGES[alert_id.breakage](alert_id.prefix, digits, suffix)


@dataclass(frozen=True)
class Pairs:
    """A JSON object as (name, value) pairs, so a name can repeat as it can in JSON text."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Generated:
    document: Any  # Pairs, or any other JSON value (a body that is not an object)
    ascii_only: bool  # \\u-escape everything; otherwise raw UTF-8 (lone surrogates then make it invalid)


def render_value(value: Any, body_number: int) -> Any:
    if isinstance(value, AlertId):
        return render_id(value, body_number)
    if isinstance(value, list):
        return [render_value(v, body_number) for v in value]
    if isinstance(value, Pairs):
        return Pairs(tuple((k, render_value(v, body_number)) for k, v in value.pairs))
    return value


def to_json(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Pairs):
        items = (f"{json.dumps(k, ensure_ascii=ascii_only)}:{to_json(v, ascii_only)}" for k, v in value.pairs)
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@dataclass(frozen=True)
class Body:
    """A rendered body: the bytes to POST and what MDE must receive for them (None: must be a 400)."""

    number: int
    data: bytes
    expected: dict[str, Any] | None


def render(generated: Generated, number: int) -> Body:
    document = render_value(generated.document, number)
    text = to_json(document, generated.ascii_only)
    try:
        return Body(number, text.encode("utf-8"), expected_body(document))
    except UnicodeEncodeError:  # a lone surrogate written raw: not UTF-8, which alertgate must refuse
        return Body(number, text.encode("utf-8", "surrogatepass"), None)


@functools.cache
def casings(word: str) -> st.SearchStrategy[str]:
    """The word in a random mix of upper and lower case, per character."""
    return st.tuples(*(st.sampled_from(sorted({c.lower(), c.upper()})) for c in word)).map("".join)


def unicode_lookalikes(word: str) -> list[str]:
    """Spellings whose lowercase mapping is unusual: Kelvin sign (→ k in Unicode), long s and dotted
    capital I (not → s, i), a zero-width space, surrounding blanks: all refused as look-alikes."""
    return [
        word.replace("k", "\u212a"),
        word.replace("s", "\u017f"),
        word.replace("i", "\u0130").replace("I", "\u0130"),
        word + "\u200b",
        " " + word,
        word + " ",
    ]


@functools.cache
def name_of(field: str) -> st.SearchStrategy[str]:
    """Mostly a casing of the name (valid); now and then a lookalike (mostly refused as unknown)."""
    return weighted(casings(field), st.sampled_from(unicode_lookalikes(field)), bad_in=20)


UNKNOWN_NAMES = st.one_of(
    st.sampled_from(
        ["state", "assigned_to", "comments", "alertId", "alert_ids", "idempotencyKey", "", "$type"]
    ),
    st.text(max_size=12),
)
OTHER_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2).map(lambda d: Pairs(tuple(d.items()))),
)
# Characters that are not controls, picked to stress code-point counting and encoding: astral (two
# UTF-16 units, four UTF-8 bytes), combining marks, RTL and zero-width format characters, U+2028.
PLAIN = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])
TRICKY = st.sampled_from(
    ["😀", "\U0010fffd", "é", "e\u0301", "\u202e", "\u200b", "\u2028", "ÿ", "€", "\ufeff"]
)
FORBIDDEN_CONTROLS = ["\x00", "\x01", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]


@st.composite
def sized_text(draw: st.DrawFn, lengths: list[int], allowed_controls: str = "") -> str:
    """A string of a length drawn from `lengths` (or small), built by repeating a short drawn pattern."""
    alphabet = st.one_of(PLAIN, TRICKY, *(st.just(c) for c in allowed_controls))
    pattern = "".join(draw(st.lists(alphabet, min_size=1, max_size=6)))
    length = draw(st.one_of(st.sampled_from(lengths), st.integers(1, 40)))
    return (pattern * (length // len(pattern) + 1))[:length]


@st.composite
def broken_text(draw: st.DrawFn, good: st.SearchStrategy[str], maximum: int, controls: list[str]) -> str:
    """Empty, one code point too long, or a good text with a forbidden character put in somewhere."""
    how = draw(st.sampled_from(["empty", "too-long", "control", "surrogate"]))
    if how == "empty":
        return ""
    if how == "too-long":
        pattern = "".join(draw(st.lists(st.one_of(PLAIN, TRICKY), min_size=1, max_size=4)))
        return (pattern * (maximum + 1))[: maximum + 1]
    text = draw(good)
    bad = draw(st.sampled_from(controls if how == "control" else LONE_SURROGATES))
    at = draw(st.integers(0, len(text)))
    return text[:at] + bad + text[at:]


def assigned_to() -> st.SearchStrategy[Any]:
    good = sized_text([1, 2, ASSIGNED_TO_MAX - 1, ASSIGNED_TO_MAX])
    bad = st.one_of(broken_text(good, ASSIGNED_TO_MAX, [*FORBIDDEN_CONTROLS, "\n", "\t", "\r"]), OTHER_JSON)
    return weighted(good, bad)


def comment() -> st.SearchStrategy[Any]:
    good = sized_text([1, 2, COMMENT_MAX - 1, COMMENT_MAX], allowed_controls="\n\r\t")
    bad = st.one_of(broken_text(good, COMMENT_MAX, FORBIDDEN_CONTROLS), OTHER_JSON)
    return weighted(good, bad)


def enum(field: str) -> st.SearchStrategy[Any]:
    values, aliases = ENUMS[field]
    good = st.one_of(
        st.sampled_from(values).flatmap(casings), st.sampled_from([*values, *aliases]).flatmap(casings)
    )
    others = [v for f, (vs, _) in ENUMS.items() if f != field for v in vs]
    bad = st.one_of(
        st.sampled_from(sorted(RETIRED_DETERMINATIONS)).flatmap(casings),
        st.sampled_from(others),
        st.sampled_from(values).flatmap(lambda v: st.sampled_from(unicode_lookalikes(v))),
        st.sampled_from(["In Progress", "false_positive", "Informational expected activity", "", "null"]),
        st.text(max_size=10),
        OTHER_JSON,
    )
    return weighted(good, bad)


def weighted(
    good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], bad_in: int = 10
) -> st.SearchStrategy[Any]:
    """Mostly good values: a body is valid only if every part is, and about half the bodies should be.

    The rare branch is the *largest* number: hypothesis favours the simplest choice (the smallest
    number) more often than chance, and the simplest body should be the common, valid one."""
    return st.integers(1, bad_in).flatmap(lambda n: bad if n == bad_in else good)


def rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in `one_in` draws (never for hypothesis' simplest choice; see `weighted`)."""
    return draw(st.integers(1, one_in)) == one_in


def foreign_id(kind: str, guid: uuid.UUID, dashes: bool, upper: bool) -> str:
    """An Office 365 (`fa`) or Cloud Apps (`ca`) alert id: the prefix and a GUID in one of its spellings."""
    text = str(guid) if dashes else guid.hex
    return kind + (text.upper() if upper else text)


def alert_id() -> st.SearchStrategy[Any]:
    shape = st.builds(
        AlertId,
        slot=st.integers(0, MAX_ALERTS + 1),
        prefix=st.one_of(st.just(""), st.text(alphabet=string.ascii_lowercase, min_size=2, max_size=2)),
        negative=st.booleans(),
        suffix=st.text(alphabet="0123456789", min_size=1, max_size=20),
    )
    broken = st.builds(
        lambda a, breakage: AlertId(a.slot, a.prefix, a.negative, a.suffix, breakage),
        shape,
        st.sampled_from(sorted(BREAKAGES)),
    )
    foreign = st.builds(foreign_id, st.sampled_from(["fa", "ca"]), st.uuids(), st.booleans(), st.booleans())
    bad = st.one_of(broken, foreign, st.text(max_size=25), OTHER_JSON)
    return weighted(shape, bad, bad_in=25)


def alert_ids() -> st.SearchStrategy[Any]:
    listed = st.lists(alert_id(), min_size=1, max_size=MAX_ALERTS + 2)
    bad: st.SearchStrategy[Any] = st.one_of(
        st.just([]), st.sampled_from(["da637399794050273582_760707377", None, 7]), OTHER_JSON
    )
    return weighted(listed, bad, bad_in=15)


# Built once: strategies are objects with a cost to build and validate, so never per draw.
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "alertIds": alert_ids(),
    "status": enum("status"),
    "assignedTo": assigned_to(),
    "classification": enum("classification"),
    "determination": enum("determination"),
    "comment": comment(),
}


@st.composite
def documents(draw: st.DrawFn) -> Generated:
    """A batchUpdate body, valid about half the time, broken in one or more ways otherwise."""
    ascii_only = draw(st.booleans())
    if rarely(draw, 40):
        other = draw(st.one_of(OTHER_JSON, st.lists(st.just(Pairs((("status", "New"),))), max_size=1)))
        return Generated(other, ascii_only)
    pairs: list[tuple[str, Any]] = []
    if not rarely(draw, 30):
        pairs.append((draw(name_of("alertIds")), draw(VALUES["alertIds"])))
    chosen = draw(st.lists(st.sampled_from(UPDATE_FIELDS), min_size=0, max_size=5, unique=True))
    if not chosen and not rarely(draw, 4):
        chosen = [draw(st.sampled_from(UPDATE_FIELDS))]
    for field in chosen:
        pairs.append((draw(name_of(field)), draw(VALUES[field])))
    if pairs and rarely(draw, 30):  # the same name again, exactly or in another casing
        name, _ = draw(st.sampled_from(pairs))
        pairs.append((draw(st.sampled_from([name, name.swapcase()])), "New"))
    if rarely(draw, 30):
        pairs.append((draw(UNKNOWN_NAMES), draw(st.one_of(st.text(max_size=5), OTHER_JSON))))
    return Generated(Pairs(tuple(draw(st.permutations(pairs)))), ascii_only)


def generate(count: int) -> list[Generated]:
    """`count` bodies from hypothesis (derandomized outside the whole suite, so CI sees the same ones)."""
    collected: list[Generated] = []

    @settings(
        max_examples=count,
        deadline=None,
        derandomize=not full_suite(),
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(documents())
    def collect(generated: Generated) -> None:
        collected.append(generated)

    collect()
    return collected


# --- the host and the run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def property_emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """An emulator process of this module's own: ten thousand calls stay out of the session's record,
    and its limits are high enough never to answer 429."""
    service = start_emulators(
        tmp_path_factory.mktemp("property-emulators"), extra_args=["--rate-limits", "100000/1"]
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def property_host(
    azurite: Service, property_emulators: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    env = app_env(
        azurite.urls["connection_string"],
        property_emulators,
        MAX_ALERTS_PER_REQUEST=str(MAX_ALERTS),
        SYNC_MAX_WAIT_SECONDS="5",
    )
    host = start_devhost(tmp_path_factory.mktemp("property-host"), env, name="devhost-properties")
    yield host
    host.stop()


@pytest.fixture
async def property_ctl(property_emulators: Service) -> AsyncIterator[EmulatorControl]:
    async with EmulatorControl(
        property_emulators.urls["mde"], property_emulators.urls["identity_base"]
    ) as control:
        await control.reset()
        yield control


async def post_all(url: str, bodies: list[Body]) -> list[tuple[int, Any]]:
    """POST every body, CONCURRENCY at a time, each with its own Idempotency-Key; (status, JSON or text)."""
    gate = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one(body: Body) -> tuple[int, Any]:
            headers = {"Content-Type": "application/json", "Idempotency-Key": f"property-{uuid.uuid4()}"}
            async with gate, http.post(url, data=body.data, headers=headers) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except ValueError:
                    return response.status, text

        return await asyncio.gather(*(one(body) for body in bodies))


def _ids(document: Any) -> list[str]:
    ids = document.get("alertIds") if isinstance(document, dict) else None
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


async def test_generated_bodies_are_refused_or_forwarded_in_canonical_form(
    property_host: Service, property_ctl: EmulatorControl
) -> None:
    """Never a 500; a 400 exactly for the bodies that break a rule, and nothing of them forwarded; every
    other body accepted and received by MDE once, exactly in its canonical form."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    bodies = [render(generated, number) for number, generated in enumerate(generate(EXAMPLES))]
    generated_at = loop.time()
    assert len(bodies) >= EXAMPLES * 0.95, f"hypothesis produced only {len(bodies)} bodies"
    valid = [(b, b.expected) for b in bodies if b.expected is not None]
    assert 0.3 <= len(valid) / len(bodies) <= 0.8, (
        f"precondition: a useful mix, {len(valid)} of {len(bodies)} valid"
    )
    ids_of_valid = [i for _, expected in valid for i in expected["alertIds"]]
    assert len(ids_of_valid) == len(set(ids_of_valid)), "precondition: every valid body has its own alert ids"

    answers = await post_all(property_host.urls["base"] + BATCH, bodies)
    posted_at = loop.time()
    problems = []
    for body, (status, document) in zip(bodies, answers, strict=True):
        expected = body.expected
        shown = body.data[:300]
        if expected is None and status != 400:
            problems.append(
                f"body {body.number} breaks a rule but got {status} {str(document)[:300]}: {shown!r}"
            )
        elif expected is None and not (isinstance(document, dict) and document.get("errors")):
            problems.append(f"body {body.number}: 400 without errors naming the field: {document}")
        elif expected is not None and status not in (200, 202):
            problems.append(f"body {body.number} is valid but got {status} {str(document)[:300]}: {shown!r}")
        elif expected is not None and document.get("alertCount") != len(expected["alertIds"]):
            problems.append(
                f"body {body.number}: alertCount {document.get('alertCount')} for {expected['alertIds']}"
            )
    assert not problems, f"{len(problems)} wrong answers, the first 20:\n" + "\n".join(problems[:20])

    calls: list[dict[str, Any]] = []

    async def all_forwarded() -> bool:
        calls[:] = await property_ctl.calls()
        forwarded = {alert for call in calls for alert in _ids(call["json"])}
        return set(ids_of_valid) <= forwarded and all(c["status"] is not None for c in calls)

    with contextlib.suppress(AssertionError):  # what is missing is reported body by body below
        await eventually(
            all_forwarded, 60.0 + len(valid) / 50, f"{len(valid)} calls at the emulator", every=0.5
        )
    # A call carries one valid body's ids, or, coalesced (docs/contracts.md §7), several bodies with the
    # same canonical update, each body's ids whole and in its own order, one after another.
    owner = {alert: (body, expected) for body, expected in valid for alert in expected["alertIds"]}
    carried: Counter[int] = Counter()
    for call in calls:
        runs: list[tuple[Any, dict[str, Any], list[str]]] = []
        for alert in _ids(call["json"]):
            if alert not in owner:
                problems.append(f"call seq={call['seq']} carried {alert!r}, which no valid body asked for")
                continue
            body, expected = owner[alert]
            if runs and runs[-1][0] is body:
                runs[-1][2].append(alert)
            else:
                runs.append((body, expected, [alert]))
        for body, expected, run in runs:
            carried[body.number] += 1
            fields = {k: v for k, v in call["json"].items() if k != "alertIds"}
            wanted = {k: v for k, v in expected.items() if k != "alertIds"}
            if (
                run != expected["alertIds"]
                or fields != wanted
                or list(call["json"]) != list(expected)
                or call["ignoredKeys"]
                or call["status"] != 200
            ):
                problems.append(
                    f"body {body.number}: MDE got {call['body'][:300]!r} ({call['status']}), "
                    f"expected {json.dumps(expected)[:300]}"
                )
    for body, _ in valid:
        if carried[body.number] != 1:
            problems.append(
                f"body {body.number}: MDE got {carried[body.number]} calls for it: {body.data[:300]!r}"
            )
    assert not problems, f"{len(problems)} forwarding problems, the first 20:\n" + "\n".join(problems[:20])

    print(
        f"\n{len(bodies)} bodies ({len(valid)} valid): generated in {generated_at - started:.1f}s, "
        f"posted in {posted_at - generated_at:.1f}s, checked in {loop.time() - posted_at:.1f}s"
    )
