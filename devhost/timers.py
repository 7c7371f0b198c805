"""Timer triggers: six-field NCRONTAB schedules (or a TimeSpan interval) and `run_on_startup`.

A schedule is `second minute hour day month day-of-week`, each field `*`, `n`, `a-b`, `*/n`, `a-b/n`,
`n/s` or a comma list of those; months and days of the week may also be written as three-letter
English names, and Sunday is 0 or 7. As in NCrontab (which the host uses), a time matches only when
*every* field matches, day-of-month and day-of-week included (classic cron would OR those two).
Times are UTC; the host's WEBSITE_TIME_ZONE is not implemented.

An invocation runs to completion before the next occurrence is computed, so a slow function skips
occurrences rather than overlapping with itself (timer functions are singletons in the real host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from azure.functions import timer as timer_binding  # the worker's concrete TimerRequest

from devhost.config import ConfigError, parse_timespan, resolve_setting_refs
from devhost.host import FunctionSpec, Invoker

log = logging.getLogger("devhost.timers")

_MONTHS = {name: i for i, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun"), 1)} | {
    name: i for i, name in enumerate(("jul", "aug", "sep", "oct", "nov", "dec"), 7)
}
_WEEKDAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
# (name, lowest, highest, names); day-of-week accepts 7 as a second Sunday.
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _WEEKDAYS),
)
_SEARCH_YEARS = 30  # long enough for "29 February that is a Monday" (a 28-year cycle)


class Schedule(Protocol):
    def next_after(self, moment: datetime) -> datetime: ...


def _value(text: str, field: str, names: Mapping[str, int]) -> int:
    lowered = text.strip().lower()
    if lowered in names:
        return names[lowered]
    if not lowered.isdigit():
        raise ConfigError(f"{field} field: {text!r} is not a number")
    return int(lowered)


def parse_field(text: str, field: str, low: int, high: int, names: Mapping[str, int]) -> frozenset[int]:
    """The set of values one NCRONTAB field allows."""
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = _value(step_text, field, {}) if slash else 1
        if step < 1:
            raise ConfigError(f"{field} field: step must be at least 1 in {part!r}")
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = _value(first, field, names), _value(last, field, names)
        else:
            start = _value(base, field, names)
            end = high if slash else start  # "5/15": from 5 every 15
        if not low <= start <= end <= high:
            raise ConfigError(f"{field} field: {part!r} is outside {low}-{high} or reversed")
        values.update(range(start, end + 1, step))
    if field == "day-of-week" and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed NCRONTAB expression with seconds."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        fields = expression.split()
        if len(fields) != 6:
            raise ConfigError(
                f"schedule {expression!r}: expected six fields "
                f"(second minute hour day month day-of-week), got {len(fields)}"
            )
        sets = [parse_field(text, *spec) for text, spec in zip(fields, _FIELDS, strict=True)]
        schedule = cls(expression, *sets)
        schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # refuse schedules that never fire
        return schedule

    def matches_day(self, moment: datetime) -> bool:
        return (
            moment.month in self.months
            and moment.day in self.days
            and (moment.weekday() + 1) % 7 in self.weekdays
        )

    def next_after(self, moment: datetime) -> datetime:
        """The first matching whole second strictly after `moment`, skipping whole days/hours/minutes."""
        t = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = moment + timedelta(days=366 * _SEARCH_YEARS)
        while t <= limit:
            if not self.matches_day(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
            elif t.second not in self.seconds:
                t += timedelta(seconds=1)
            else:
                return t
        raise ConfigError(f"schedule {self.expression!r} never fires")


@dataclass(frozen=True)
class IntervalSchedule:
    """The TimeSpan form ("00:05:00"): every interval after the previous occurrence."""

    interval: float

    def next_after(self, moment: datetime) -> datetime:
        return moment + timedelta(seconds=self.interval)


def parse_schedule(expression: str) -> Schedule:
    """NCRONTAB when it has fields, else a TimeSpan interval (the host accepts both)."""
    if len(expression.split()) > 1:
        return CronSchedule.parse(expression)
    interval = parse_timespan(expression, setting=f"schedule {expression!r}")
    if interval <= 0:
        raise ConfigError(f"schedule {expression!r}: the interval must be positive")
    return IntervalSchedule(interval)


@dataclass(frozen=True)
class TimerBinding:
    """A timer trigger with its schedule resolved (`%SETTING%` allowed) and parsed at start-up."""

    spec: FunctionSpec
    expression: str
    schedule: Schedule
    run_on_startup: bool

    @classmethod
    def resolve(cls, spec: FunctionSpec, environ: Mapping[str, str]) -> TimerBinding:
        where = f"function {spec.name}"
        expression = resolve_setting_refs(str(getattr(spec.trigger, "schedule", "")), environ, where=where)
        try:
            schedule = parse_schedule(expression)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return cls(spec, expression, schedule, bool(getattr(spec.trigger, "run_on_startup", False)))

    def describe(self) -> str:
        startup = ", run_on_startup" if self.run_on_startup else ""
        return f"{self.spec.name}: timerTrigger schedule={self.expression!r}{startup}"


class TimerRunner:
    """Fires one timer function on its schedule until stop is set."""

    def __init__(self, binding: TimerBinding, invoke: Invoker) -> None:
        self.binding = binding
        self._invoke = invoke

    async def run(self, stop: asyncio.Event) -> None:
        if self.binding.run_on_startup:
            await self._fire(datetime.now(UTC), "run on startup")
        last = datetime.now(UTC)
        while not stop.is_set():
            # From the later of now and the last occurrence: a sleep that wakes a little early must not
            # make the same occurrence fire twice.
            due = self.binding.schedule.next_after(max(datetime.now(UTC), last))
            delay = (due - datetime.now(UTC)).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(delay, 0.0))
            if stop.is_set():
                break
            await self._fire(due, "Timer fired")
            last = due

    async def _fire(self, now: datetime, reason: str) -> None:
        upcoming = self.binding.schedule.next_after(now)
        status = {"Last": now.isoformat(), "Next": upcoming.isoformat(), "LastUpdated": now.isoformat()}
        request = timer_binding.TimerRequest(past_due=False, schedule_status=status, schedule={})
        with contextlib.suppress(Exception):  # the Invoker logged it; a timer just waits for the next time
            await self._invoke(self.binding.spec, request, f"{reason} at {now.isoformat()}")
