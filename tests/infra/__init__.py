"""Checks of the Azure deployment (infra/, azure.yaml, openapi.yaml) against the app itself.

What the app registers (HTTP routes, queue and timer triggers) is discovered from function_app.py, not
copied into the tests, so a new route or queue fails the checks until the deployment and the API
document follow. The app is imported in a subprocess with a minimal environment: importing it reads and
validates the settings once per process, which must not leak into (or depend on) the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

_DISCOVER = """
import json
import function_app

found = []
for function in function_app.app.get_functions():
    trigger = function.get_trigger()
    methods = getattr(trigger, "methods", None) or []
    found.append({
        "name": function.get_function_name(),
        "type": trigger.get_binding_name(),
        "route": getattr(trigger, "route", None),
        "methods": [getattr(m, "value", str(m)) for m in methods],
        "queue": getattr(trigger, "queue_name", None),
    })
print(json.dumps(found))
"""


@cache
def registered_functions() -> tuple[dict[str, Any], ...]:
    """Every function of the app with its trigger type, HTTP route and methods, or queue name."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Only what the settings require; everything else takes its documented default.
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    }
    done = subprocess.run(
        [sys.executable, "-c", _DISCOVER],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing function_app failed:\n{done.stderr}")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))
