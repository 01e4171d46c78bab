"""OpenTelemetry tracing, on only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the OTLP/HTTP
exporter reads it and the other OTEL_* variables itself), so the service starts without a
collector. A request is a server span; its database statements are child spans. A group-commit
batch runs in the context of the request that opened it, so its statements are that request's
children."""

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["OpenTelemetryMiddleware", "instrument_engine", "tracer_provider", "uninstrument"]


def tracer_provider(exporter: SpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "wallet"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def instrument_engine(engine: AsyncEngine, provider: TracerProvider) -> None:
    # The instrumentation declares "sqlalchemy < 2.1" and, by default, logs an error and
    # instruments nothing on the SQLAlchemy 2.1 the service pins; the engine events it uses are
    # unchanged in 2.1 (tests/api/test_api_tracing.py checks the spans), so skip that check.
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True
    )


def uninstrument(provider: TracerProvider) -> None:
    """Flush the spans still buffered and stop tracing the engine."""
    SQLAlchemyInstrumentor().uninstrument()
    provider.shutdown()
