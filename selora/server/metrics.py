"""Prometheus metrics of one app (its own ``CollectorRegistry``, so several apps can coexist).

Labels stay bounded: the ``adapter`` label of request counts is a registered adapter's address
(``tenant/name``), ``base``, ``none`` (no model named) or ``unknown``, and at most
``MAX_ADAPTER_LABELS`` of them (then ``other``). ``selora_lora_requests_info`` has vLLM's ``lora_requests_info`` shape: one
series whose labels list the adapters with running and waiting requests, so a gateway can route
by adapter."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_TENANT_LABELS = 64  # tenants beyond the first 64 seen are counted as "other"
MAX_ADAPTER_LABELS = 256


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("selora_request_latency_seconds", "request latency by route", ["route"], registry=r)
        self.batch_size = Histogram("selora_batch_size", "rows per forward", ["modality"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("selora_queue_depth", "rows waiting for a forward", registry=r)
        self.adapters_resident = Gauge("selora_adapters_resident", "adapters resident", ["tier"], registry=r)
        self.bytes_resident = Gauge("selora_adapter_bytes_resident", "bytes of resident adapters", ["tier"], registry=r)
        self.adapters_registered = Gauge("selora_adapters_registered", "adapters registered", registry=r)
        self.loads = Counter("selora_adapter_loads", "adapter loads into a tier", ["tier"], registry=r)
        self.evictions = Counter("selora_adapter_evictions", "adapter evictions from a tier", ["tier"], registry=r)
        self.errors = Counter("selora_errors", "error responses by type", ["type"], registry=r)
        self.requests = Counter("selora_tenant_requests", "authenticated requests by tenant", ["tenant"], registry=r)
        self.tenant_adapters = Gauge("selora_tenant_adapters", "stored adapters by tenant", ["tenant"], registry=r)
        self.tenant_bytes = Gauge("selora_tenant_stored_bytes", "stored adapter bytes by tenant", ["tenant"], registry=r)
        self._tenants: set[str] = set()
        self.responses = Counter("selora_requests", "requests by route, status and adapter", ["route", "status", "adapter"], registry=r)
        self.cache = Counter("selora_adapter_cache_lookups", "adapter cache lookups by tier and result (hit or miss)",
                             ["tier", "result"], registry=r)
        self.lora_info = Gauge("selora_lora_requests_info", "adapters with running / waiting requests (vLLM lora_requests_info shape); "
                               "value: when sampled", ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._adapter_labels: set[str] = set()

    def _tenant_label(self, tenant: str) -> str:
        if tenant not in self._tenants and len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
        return tenant if tenant in self._tenants else "other"

    def on_request(self, tenant: str) -> None:
        self.requests.labels(self._tenant_label(tenant)).inc()

    def on_registry_event(self, event: str, tier: str) -> None:
        if event in ("hit", "miss"):
            self.cache.labels(tier, event).inc()
        else:
            (self.loads if event == "load" else self.evictions).labels(tier).inc()

    def on_response(self, route: str, status: int, adapter: str) -> None:
        """``adapter``: already one of the bounded values (see the module docstring) but for the cap."""
        if adapter not in self._adapter_labels:
            if len(self._adapter_labels) >= MAX_ADAPTER_LABELS:
                adapter = "other"
            else:
                self._adapter_labels.add(adapter)
        self.responses.labels(route, str(status), adapter).inc()

    def on_batch(self, modality: str, rows: int) -> None:
        self.batch_size.labels(modality).observe(rows)

    def on_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self, engine=None) -> bytes:
        """Prometheus text; gauges sampled from ``engine`` (and its registry) now."""
        if engine is not None:
            self.queue_depth.set(engine.queued_rows)
            self.adapters_registered.set(len(engine.registry.current()))
            for tier, (count, nbytes) in engine.registry.resident().items():
                self.adapters_resident.labels(tier).set(count)
                self.bytes_resident.labels(tier).set(nbytes)
            usage: dict[str, list[int]] = {}
            for tenant, (count, nbytes) in engine.registry.store.usage().items():
                totals = usage.setdefault(self._tenant_label(tenant), [0, 0])
                totals[0], totals[1] = totals[0] + count, totals[1] + nbytes
            for gauge in (self.tenant_adapters, self.tenant_bytes):
                gauge.clear()
            for label, (count, nbytes) in usage.items():
                self.tenant_adapters.labels(label).set(count)
                self.tenant_bytes.labels(label).set(nbytes)
            running, waiting = engine.requests_by_adapter()
            self.lora_info.clear()
            self.lora_info.labels(",".join(sorted(running)), ",".join(sorted(waiting)), str(engine.max_batch_size)).set(time.time())
        return generate_latest(self.registry)
