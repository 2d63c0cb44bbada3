"""A fork server for the kill harness: imports `kd_lib.cli` (and torch._dynamo, which AdamW imports on first use) once,
then forks one child per request that runs `kd_lib.cli.main(args)` -- the `kd-lib` console script's entry point -- with
stdout and stderr in a log file. A child is a real process, SIGKILLed like any other; forking skips the ~5 s of
interpreter and torch start-up that would otherwise dominate each kill/resume cycle.

Protocol (JSON lines on stdin/stdout): {"start": [args], "log": path, "env": {...}} -> {"pid": n};
{"poll": pid} -> {"rc": int | null}; {"wait": pid} -> {"rc": int}."""
import json
import os
import sys
import traceback

import torch._dynamo  # noqa: F401  (imported lazily by the first optimizer otherwise: seconds per child)

from kd_lib.cli import main


def _child(args: list, log: str, env: dict):
    "Run the CLI in the forked child; never returns."
    rc = 1
    try:
        os.setsid()
        devnull, out = os.open(os.devnull, os.O_RDONLY), os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout, sys.stderr = open(1, 'w', buffering=1, closefd=False), open(2, 'w', buffering=1, closefd=False)
        os.environ.update(env)
        rc = main(args)
    except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
    except BaseException: traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr): stream.flush()
        os._exit(rc)


def serve():
    for line in sys.stdin:
        req = json.loads(line)
        if 'start' in req:
            pid = os.fork()
            if pid == 0: _child(req['start'], req['log'], req.get('env', {}))
            reply = {'pid': pid}
        else:
            pid = req.get('poll') or req['wait']
            done, status = os.waitpid(pid, os.WNOHANG if 'poll' in req else 0)
            reply = {'rc': os.waitstatus_to_exitcode(status) if done else None}
        print(json.dumps(reply), flush=True)


if __name__ == '__main__':
    print(json.dumps({'ready': True}), flush=True)
    serve()
