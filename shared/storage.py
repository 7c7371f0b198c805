"""Storage clients built from the AzureWebJobsStorage settings (connection string or identity-based).

With identity-based settings the same user-assigned identity that the Functions host uses for storage
(`AzureWebJobsStorage__clientId`) is used here, so one role assignment covers both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.data.tables.aio import TableServiceClient

    from shared.settings import StorageSettings


def storage_credential(storage: StorageSettings) -> AsyncTokenCredential | None:
    """None with a connection string; otherwise the credential the `__credential` setting names."""
    if storage.connection_string:
        return None
    from shared.tokens import make_credential

    use_mi = (storage.credential or "").lower() == "managedidentity"
    return make_credential(use_mi, storage.client_id)


def table_service(storage: StorageSettings, credential: AsyncTokenCredential | None) -> TableServiceClient:
    from azure.data.tables.aio import TableServiceClient

    if storage.connection_string:
        return TableServiceClient.from_connection_string(storage.connection_string)
    assert storage.table_service_uri is not None and credential is not None  # settings guarantee both
    return TableServiceClient(endpoint=storage.table_service_uri, credential=credential)
