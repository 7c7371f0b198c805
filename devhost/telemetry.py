"""Where the development host sends alertgate's telemetry: what the Functions worker does in Azure, locally.

In Azure the host's OpenTelemetry mode has the Python worker call `configure_azure_monitor()` before the
app's code runs; alertgate only uses the OpenTelemetry API (docs/telemetry.md). The development host does
the same when it is asked to, and nothing otherwise, so a local run sends telemetry nowhere by default:

- `APPLICATIONINSIGHTS_CONNECTION_STRING` set (non-empty): the Azure Monitor distro, as in Azure;
- else `OTEL_EXPORTER_OTLP_ENDPOINT` set: OpenTelemetry's OTLP/HTTP exporters (a local collector, Aspire
  dashboard, Jaeger...), if `opentelemetry-exporter-otlp-proto-http` is installed; it is not a dependency
  of alertgate, so without it the host says how to get it and goes on with telemetry off;
- else: off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

log = logging.getLogger(__name__)

Choice = Literal["azure-monitor", "otlp", "off"]
OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"


def choice(environ: Mapping[str, str]) -> Choice:
    if environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "").strip():
        return "azure-monitor"
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return "otlp"
    return "off"


def configure(environ: Mapping[str, str]) -> str:
    """Set the global OpenTelemetry providers as `choice` says; a line saying where telemetry goes."""
    chosen = choice(environ)
    if chosen == "azure-monitor":
        from azure.monitor.opentelemetry import configure_azure_monitor

        configure_azure_monitor()
        return "telemetry: Azure Monitor (APPLICATIONINSIGHTS_CONNECTION_STRING)"
    if chosen == "otlp":
        return _configure_otlp(environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return (
        "telemetry: off (set APPLICATIONINSIGHTS_CONNECTION_STRING or OTEL_EXPORTER_OTLP_ENDPOINT to send it)"
    )


def _configure_otlp(endpoint: str) -> str:
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[import-not-found]
            OTLPLogExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[import-not-found]
            OTLPMetricExporter,
        )
    except ImportError:
        return (
            f"telemetry: off (OTEL_EXPORTER_OTLP_ENDPOINT is set but {OTLP_PACKAGE} is not installed: "
            f"`.venv/bin/pip install {OTLP_PACKAGE}`)"
        )
    from opentelemetry import _logs, metrics
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    metrics.set_meter_provider(
        MeterProvider(metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    )
    loggers = LoggerProvider()
    loggers.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    _logs.set_logger_provider(loggers)
    return f"telemetry: OTLP/HTTP to {endpoint}"
