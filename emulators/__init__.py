"""Local stand-ins for the Microsoft services alertgate calls, for tests and the local run.

`python -m emulators` starts two aiohttp servers in one process: an App Service style managed-identity
token endpoint (`identity`) and the Defender for Endpoint alert batch-update API (`mde`). They share one
in-memory token registry, so the MDE side accepts exactly the tokens the identity side issued. Both
record every call and expose a `/_emulator/` control API; `emulators.control.EmulatorControl` is its
client. See emulators/README.md.
"""
