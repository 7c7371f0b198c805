"""Local stand-ins for the Microsoft services alertgate calls, for tests and the local run.

`python -m emulators` starts three aiohttp servers in one process: an App Service style managed-identity
token endpoint (`identity`), the Defender for Endpoint alert-update APIs (`mde`) and an Entra token
endpoint for the client-assertion grant (`entra`, over https). They share one in-memory token registry,
so the MDE side accepts exactly the tokens the identity and Entra sides issued, and attributes each call
to the token's tenant. All record every call and expose a `/_emulator/` control API;
`emulators.control.EmulatorControl` is its client. See emulators/README.md.

The fixed ids below are what the emulators answer unless told otherwise on the command line
(`--home-tenant-id`, `--identity-principal-id`, `--app-client-id`); tests import them from here. This
module imports nothing, so reading a constant never pulls in aiohttp.
"""

# The managed identity's own (home) tenant: the `tid` of every token the identity endpoint issues.
HOME_TENANT_ID = "00000000-7e4a-4000-8000-00000000a1e7"
# The managed identity's object (principal) id: the `sub` of its token-exchange assertion, and the
# subject of the federated identity credential the Entra emulator's application trusts.
IDENTITY_PRINCIPAL_ID = "00000000-0b1d-4000-8000-00000000a1e7"
# The multi-tenant Entra application whose federated identity credential trusts that identity.
APP_CLIENT_ID = "00000000-a99c-4000-8000-00000000a1e7"
# The audience (resource) of the managed identity's token that a federated identity credential accepts.
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"

__all__ = ["APP_CLIENT_ID", "EXCHANGE_AUDIENCE", "HOME_TENANT_ID", "IDENTITY_PRINCIPAL_ID"]
