"""Where the development host sends telemetry: nowhere unless asked (devhost/telemetry.py)."""

from __future__ import annotations

import importlib.util

import pytest

from devhost.telemetry import OTLP_PACKAGE, choice, configure


@pytest.mark.parametrize(
    ("environ", "chosen"),
    [
        ({}, "off"),
        ({"APPLICATIONINSIGHTS_CONNECTION_STRING": "  "}, "off"),
        (
            {
                "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000"
            },
            "azure-monitor",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "otlp"),
        (
            {
                "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            },
            "azure-monitor",
        ),
    ],
)
def test_the_choice_follows_the_settings(environ: dict[str, str], chosen: str) -> None:
    assert choice(environ) == chosen


def test_with_nothing_set_telemetry_is_off_and_says_how_to_turn_it_on() -> None:
    said = configure({})
    assert said.startswith("telemetry: off") and "APPLICATIONINSIGHTS_CONNECTION_STRING" in said


def _otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp") is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


@pytest.mark.skipif(_otlp_installed(), reason="the OTLP exporter is installed")
def test_an_otlp_endpoint_without_the_exporter_names_the_package_and_stays_off() -> None:
    said = configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert said.startswith("telemetry: off") and OTLP_PACKAGE in said
