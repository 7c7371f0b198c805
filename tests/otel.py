"""alertgate's telemetry on the real OpenTelemetry SDK, read back in memory (the unit and integration
telemetry tests share it): an InMemoryMetricReader for the metrics, an InMemoryLogRecordExporter for the
operation events."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint

from shared.telemetry import Telemetry

Attributes = frozenset[tuple[str, Any]]


def attrs(**values: Any) -> Attributes:
    return frozenset(values.items())


class Otel:
    """A `Telemetry` on its own SDK providers (never the global ones), and what it recorded."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
        self.loggers = LoggerProvider()
        self.loggers.add_log_record_processor(SimpleLogRecordProcessor(self.logs))
        self.telemetry = Telemetry(self.meters, self.loggers)

    def named(self, name: str) -> dict[Attributes, Any]:
        """One metric's data points by attributes: a sum's value, a gauge's last value, a histogram's
        (count, sum)."""
        found: dict[Attributes, Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        key = frozenset((point.attributes or {}).items())
                        if isinstance(point, HistogramDataPoint):
                            found[key] = (point.count, point.sum)
                        else:
                            assert isinstance(point, NumberDataPoint)
                            found[key] = point.value
        return found

    def events(self) -> list[dict[str, Any]]:
        return [dict(item.log_record.attributes or {}) for item in self.logs.get_finished_logs()]

    def shutdown(self) -> None:
        self.meters.shutdown()
        self.loggers.shutdown()
