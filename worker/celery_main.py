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

Pygments is left out too: Celery's command helpers (celery/bin/base.py) import it, if it is
installed, only to colour the output of `celery inspect` & co., and print plain text
without it (their documented fallback); the worker and beat never use it, and its lexer
tables would be one more weight in every process.

`celery -A worker.celery_app worker` keeps working, as docker-compose.yml runs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

ROLES = ("worker", "beat")
APP = "worker.celery_app"


def main(argv: Sequence[str] | None = None) -> int:
    """Run Celery's `worker` or `beat` command (argv[0]) with the options after it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES:
        print(f"usage: python -m worker.celery_main {{{'|'.join(ROLES)}}} [celery options]",
              file=sys.stderr)
        return 2
    role, options = args[0], args[1:]
    # An import of pygments in this process now fails (ModuleNotFoundError, as when it is
    # not installed); one made already is kept.
    sys.modules.setdefault("pygments", None)  # type: ignore[arg-type]
    # Imported only here, as `celery` imports them: after the command line is read.
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext

    if role == "worker":
        from celery.bin.worker import worker as command
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


if __name__ == "__main__":
    raise SystemExit(main())
