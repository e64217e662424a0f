"""Apprise's notification plugins, loaded one module at a time as the channel URLs need them.

Apprise keeps its plugins in one manager per process (`N_MGR`, apprise/manager.py), which
on the first question about any schema (`schema in N_MGR`, `N_MGR[schema]`) imports every
plugin module Apprise ships: about 180 modules and the libraries some of them pull in
(oauthlib, xml, ...), some 6 MB in every worker process, of which a worker sends through
two. Here the manager is given, first, only the modules of the schemas asked for, through
its own loader (`load_modules(path, name)`, pointed at a folder that lists just that
module, under Apprise's own package name), so each is imported and registered exactly as
Apprise's full scan would do it. A schema whose module is not known by name, and a
provider's native URL (`https://discord.com/api/webhooks/...`, found by asking every
plugin), make Apprise load all its plugins, as it always did: never less than before,
only later.

`has_plugin(schema)` answers (and loads) for `worker/delivery.py`; `load_plugins(schemas)`
loads the configured channels' plugins at a process's warm-up. Thread-safe: the senders'
threads may ask at once.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable

from apprise.apprise import N_MGR
from apprise.utils.parse import GET_SCHEMA_RE

# Schemas whose plugin module has another name (apprise/plugins/<module>.py or a package).
# The rest are found by name: "twilio" in twilio.py, "discords" ... discord.py. A schema
# missing here only costs memory: Apprise then loads every plugin.
MODULES = {
    "mailto": "email", "mailtos": "email",
    "json": "custom_json", "jsons": "custom_json",
    "form": "custom_form", "forms": "custom_form",
    "xml": "custom_xml", "xmls": "custom_xml",
    "apprise": "apprise_api", "apprises": "apprise_api",
    "atalk": "africas_talking", "d7sms": "d7networks", "46elks": "fortysixelks",
    "elks": "fortysixelks", "kudosity": "burstsms", "klr": "kaleyra",
    "mobilemsg": "mobilemessage", "msgbird": "messagebird", "nexmo": "vonage",
    "smsmgr": "smsmanager", "signal": "signal_api", "signals": "signal_api",
    "tgram": "telegram", "o365": "office365", "azure": "office365",
}
# Apprise's own rule for a module its loader may import (manager.py `module_re`).
_MODULE_NAME = re.compile(r"^(?!base|_)[a-z0-9_]+$")

_lock = threading.Lock()
_ready: set[str] = set()  # schemas with a loaded plugin (read without the lock)
_everything = False  # Apprise has loaded every plugin: `schema in N_MGR` is the answer


def schema_of(url: str) -> str:
    """Return the lower-case schema of an Apprise URL ("" if it has none), as Apprise reads it."""
    found = GET_SCHEMA_RE.match(url.replace("/#", "/%23"))
    return found["schema"].lower() if found else ""


def has_plugin(schema: str) -> bool:
    """Return whether Apprise has a plugin for `schema` (lower case), loading it first if
    it is not loaded yet: its module alone when known by name, else every plugin."""
    if schema in _ready:
        return True
    with _lock:
        if _everything or schema in _ready:
            return schema in _ready or _known(schema)
        # N_MGR is falsy until something loaded it: asking it a schema would load them all.
        if not (N_MGR and schema in N_MGR):
            module = _module_of(schema)
            if module is not None:
                _load_module(module)
        if not (N_MGR and schema in N_MGR):
            _load_everything()
        return _known(schema)


def load_plugins(schemas: Iterable[str]) -> None:
    """Load the plugins of `schemas` now (a process's warm-up: the first message of a
    burst does not wait for an import)."""
    for schema in schemas:
        has_plugin(schema)


def plugins_loaded() -> int:
    """How many of Apprise's plugin modules this process has imported (for tests, ops)."""
    prefix = N_MGR.module_name_prefix + "."
    return len({name.split(".")[2] for name in list(sys.modules) if name.startswith(prefix)
                and name.split(".")[2] != "base"})


def _known(schema: str) -> bool:
    found = schema in N_MGR
    if found:
        _ready.add(schema)
    return found


def _module_of(schema: str) -> str | None:
    """The plugin module that should hold `schema`, if one by that name exists."""
    for name in (MODULES.get(schema), schema, schema[:-1] if schema.endswith("s") else None):
        if name and _MODULE_NAME.match(name) and _entry(name) is not None:
            return name
    return None


def _entry(module: str) -> str | None:
    """The entry of `module` in Apprise's plugin folder ("x.py" or the package "x")."""
    folder = N_MGR.module_path
    if os.path.isfile(os.path.join(folder, f"{module}.py")):
        return f"{module}.py"
    if os.path.isfile(os.path.join(folder, module, "__init__.py")):
        return module
    return None


def _load_module(module: str) -> None:
    """Have Apprise's loader import and register one plugin module, as its scan would."""
    entry = _entry(module)
    if entry is None:
        return
    with tempfile.TemporaryDirectory(prefix="apprise-plugin-") as folder:
        # The loader lists the folder and imports `apprise.plugins.<name>` (Apprise's own
        # package, so the module is the one a full scan imports); the link is its fallback.
        os.symlink(os.path.join(N_MGR.module_path, entry), os.path.join(folder, entry))
        N_MGR.load_modules(  # type: ignore[no-untyped-call]  # Apprise: untyped
            path=folder, name=N_MGR.module_name_prefix)


def _load_everything() -> None:
    global _everything
    # Apprise's full scan: the modules loaded above are kept (it skips them by name).
    N_MGR.load_modules()  # type: ignore[no-untyped-call]  # Apprise: untyped
    _everything = True


__all__ = ["MODULES", "has_plugin", "load_plugins", "plugins_loaded", "schema_of"]
