"""`python -m worker.celery_main worker|beat [options]`: Celery's own `worker` and `beat`
commands on this project's app, without the rest of Celery's command line.

The same as `celery -A worker.celery_app worker|beat [options]` (the same click commands,
options, environment variables and exit codes: celery/bin/worker.py and beat.py), minus
the import of every other `celery` sub-command. One of them, `celery amqp`, imports its
REPL (click_repl, prompt_toolkit, pygments: about 170 modules, 7 MB) at import time. The
worker's main process would hold them for nothing, and each prefork pool process would
inherit them: the pages a pool process inherits count in its own resident size too, so
the worker's summed RSS carries that weight three times (`reminders run` starts the
worker and beat this way: worker/service.py `celery_command`).

Optional imports are left out too, as if those libraries were not installed (their
callers handle that; each would weigh on every process):
- pygments: Celery's command helpers (celery/bin/base.py) import it only to colour the
  output of `celery inspect` & co., and print plain text without it.
- charset_normalizer (3.7 MB in each pool process, measured): requests imports it to guess
  the charset of a response body that declares none (`Response.apparent_encoding`), and
  without it takes UTF-8 (requests/models.py). Nothing here decodes such a body: the
  classification reads HTTP statuses and Apprise's lines, the webhooks their statuses.
- yaml (PyYAML, about 0.8 MB in the main process, so in each process): kombu registers its
  YAML serializer with it (kombu/serialization.py `register_yaml`), else a stub that
  refuses YAML messages. Every message here is JSON (`accept_content`), and no Apprise
  configuration file is read (its YAML loader imports it when one is parsed).
- opentelemetry (the API package, if installed): redis-py imports it for its OpenTelemetry
  metrics, which stay off unless the application sets them up; this one does not.

`celery -A worker.celery_app worker` keeps working; docker-compose.yml and the Dockerfile
run this module too. Without `--loglevel` (as there), the level is REMINDERS_LOG_LEVEL.

`worker --detach` starts the worker again in the background as Celery does, through this
module: Celery's own command re-runs `python -m celery` with this command line, which
names no app (it would start Celery's default app on amqp://localhost and never serve).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

ROLES = ("worker", "beat")
# Optional imports of libraries the worker and beat do without (see the docstring).
LEFT_OUT = ("pygments", "charset_normalizer", "yaml", "opentelemetry")
NO_CHARSET_GUESSING = "Unable to find acceptable character detection dependency"
APP = "worker.celery_app"
MODULE = "worker.celery_main"  # this module, as `python -m` runs it (its __name__ is __main__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run Celery's `worker` or `beat` command (argv[0]) with the options after it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES:
        print(f"usage: python -m worker.celery_main {{{'|'.join(ROLES)}}} [celery options]",
              file=sys.stderr)
        return 2
    role, options = args[0], args[1:]
    if not _names_log_level(options) and not os.environ.get(f"CELERY_{role.upper()}_LOGLEVEL"):
        # No --loglevel: REMINDERS_LOG_LEVEL (Celery's own default, WARNING, would win over
        # it, as it reaches our logging setup as the level Celery was given).
        from .settings import get_settings

        options = [f"--loglevel={get_settings().log_level}", *options]
    # An import of these in this process (and its pool processes) now fails
    # (ModuleNotFoundError, as when they are not installed); one made already is kept.
    for name in LEFT_OUT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    # requests says once, at import, that it guesses no charsets; known and meant here.
    warnings.filterwarnings("ignore", message=NO_CHARSET_GUESSING, module="requests")
    # Imported only here, as `celery` imports them: after the command line is read.
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext

    if role == "worker":
        from celery.bin import worker as worker_command
        from celery.bin.worker import worker as command

        _detach_through_this_module(worker_command)
    else:
        from celery.bin.beat import beat as command
    app = find_app(APP)
    # As `celery` does (celery/bin/celery.py): the app's own options for the command, and
    # the context object the command reads its app from; CELERY_WORKER_* (CELERY_BEAT_*)
    # environment variables as `celery` reads them (its auto_envvar_prefix is "CELERY").
    command.params.extend(app.user_options.get(role, []))
    obj = CLIContext(app=app, no_color=False, workdir=None, quiet=False)
    try:
        command.main(options, prog_name=f"celery {role}", obj=obj,
                     auto_envvar_prefix=f"CELERY_{role.upper()}")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _names_log_level(options: Sequence[str]) -> bool:
    """Whether Celery's command line gives a log level (-l LEVEL, -lLEVEL, --loglevel[=]LEVEL)."""
    return any(option == "--loglevel" or option.startswith("--loglevel=")
               or (option.startswith("-l") and not option.startswith("--"))
               for option in options)


def _detach_through_this_module(module: Any) -> None:
    """Make the worker's `--detach` run `python -m worker.celery_main` again, not `celery`.

    celery/bin/worker.py re-runs the worker detached as `[sys.executable, "-m", "celery",
    *sys.argv[1:]]`: from `celery -A app worker ...` that names the app; from this module's
    command line (`worker ...`) it would not.
    """
    detach = module.detach
    if getattr(detach, "through_celery_main", False):
        return

    def through_this_module(path: str, argv: list[str], *args: Any, **kwargs: Any) -> Any:
        if argv[:2] == ["-m", "celery"]:
            argv = ["-m", MODULE, *argv[2:]]
        return detach(path, argv, *args, **kwargs)

    through_this_module.through_celery_main = True  # type: ignore[attr-defined]
    module.detach = through_this_module


if __name__ == "__main__":
    raise SystemExit(main())
