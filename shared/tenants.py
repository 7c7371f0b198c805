"""Per-tenant services, resolved from a context the edge decides (docs/architecture.md, "Tenants").

MDE's API, its limits and its alerts are per tenant, so everything that talks to MDE or keeps state about
it belongs to one tenant: its token provider, its channels and their budget rows, its ledger partition
and its idempotency key space. The process-wide parts (settings, the aiohttp session, the storage clients
and queues) are shared by all tenants (shared.runtime).

The home tenant, and the customer tenants of DEFENDER_TENANTS (docs/contracts.md §8). The home tenant
keeps the names that state written before tenants existed uses: key hashes without a key space, the ledger
partition `ledger`, the budget rows in partition `mde`. An upgrade therefore forgets no key, operation or
call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.channels.base import Transport
    from shared.channels.batch_update import BatchUpdateChannel
    from shared.channels.patch import PatchChannel
    from shared.idempotency import IdempotencyStore
    from shared.intake import Intake
    from shared.ledger import Ledger
    from shared.queues import Queues
    from shared.ratelimit import RateLimiter
    from shared.sender import Sender
    from shared.settings import RateWindow, Settings, TenantSettings
    from shared.storage import Tables
    from shared.telemetry import EndWatcher, Telemetry
    from shared.tokens import TokenProvider
    from shared.worker import Worker

HOME = "home"


class UnknownTenant(LookupError):
    """A tenant name that this deployment does not serve."""


@dataclass(frozen=True)
class TenantContext:
    """Where one tenant's state lives: decided at the edge, before any service is touched."""

    name: str
    key_space: str  # mixed into idempotency key hashes; "" keeps the hashes of before tenants
    ledger_partition: str
    budget_partition: str

    @classmethod
    def home(cls) -> TenantContext:
        return cls(HOME, key_space="", ledger_partition="ledger", budget_partition="mde")

    @classmethod
    def customer(cls, name: str, tenant_id: str) -> TenantContext:
        """A customer tenant's state is keyed by its tenant id, not its name: renaming a tenant in
        DEFENDER_TENANTS keeps its keys, operations and budget."""
        return cls(
            name,
            key_space=tenant_id,
            ledger_partition=f"ledger-{tenant_id}",
            budget_partition=f"mde-{tenant_id}",
        )


@dataclass
class TenantServices:
    """One tenant's services, built once per process."""

    context: TenantContext
    tokens: TokenProvider
    batch_update: BatchUpdateChannel
    patch: PatchChannel | None  # None when DEFENDER_PATCH_RATE_LIMITS is off
    ledger: Ledger
    keys: IdempotencyStore
    sender: Sender
    worker: Worker
    intake: Intake
    watcher: EndWatcher | None = None  # the operation-end checks still running are awaited at close

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.drain()
        await self.tokens.close()


def build_tenant(
    context: TenantContext,
    profile: TenantSettings,
    settings: Settings,
    tokens: TokenProvider,
    transport: Transport,
    tables: Tables,
    queues: Queues,
    telemetry: Telemetry | None = None,
) -> TenantServices:
    """Wire one tenant's services on the process-wide parts; `profile` says where its MDE is and its limits."""
    from shared.channels import batch_update, patch
    from shared.idempotency import IdempotencyStore
    from shared.intake import Intake
    from shared.ledger import Ledger
    from shared.ratelimit import RateLimiter
    from shared.sender import Sender
    from shared.worker import Worker

    def limiter(windows: tuple[RateWindow, ...], row_key: str) -> RateLimiter:
        return RateLimiter(
            tables.budget,
            windows,
            settings.rate_limit_safety_margin_seconds,
            partition_key=context.budget_partition,
            row_key=row_key,
        )

    batch_limit = batch_update.BatchLimit(
        settings.defender_max_alerts_per_call, tables.budget, partition_key=context.budget_partition
    )
    channel = batch_update.BatchUpdateChannel(
        transport,
        profile.batch_update_url,
        limiter(profile.rate_limits, batch_update.BUDGET_ROW_KEY),
        batch_limit,
        settings.defender_enum_overrides,
    )
    single: patch.PatchChannel | None = None
    if profile.patch_rate_limits is not None:
        single = patch.PatchChannel(
            transport,
            profile.alerts_url,
            limiter(profile.patch_rate_limits, patch.BUDGET_ROW_KEY),
            settings.defender_enum_overrides,
        )
    ledger = Ledger(tables.operations, partition=context.ledger_partition)
    keys = IdempotencyStore(
        tables.keys,
        explicit_ttl=settings.idempotency_ttl_seconds,
        derived_ttl=settings.derived_key_ttl_seconds,
        claim_lease=settings.sync_max_wait_seconds
        + 2 * settings.defender_http_timeout_seconds
        + settings.sweep_grace_seconds,
        key_space=context.key_space,
    )
    figures = telemetry.tenant(context.name) if telemetry is not None else None
    watcher: EndWatcher | None = None
    if figures is not None:
        from shared.telemetry import EndWatcher

        watcher = EndWatcher(ledger, figures)
        ledger.watcher = watcher
    sender = Sender(settings, ledger, channel, tokens, queues, patch=single, telemetry=figures)
    return TenantServices(
        context,
        tokens,
        channel,
        single,
        ledger,
        keys,
        sender,
        Worker(sender),
        Intake(settings, keys, ledger, sender),
        watcher,
    )
