"""``hvext daemon start|stop|restart|reload|status``: hvextd on a host without systemd.

hvextd runs detached with a pid file under /run (``/run/hvext/hvextd.pid``)
and logs to ``/var/log/hvext/hvextd.log``; see hvext/daemon/service.py. With
systemd, use the ``hvextd.service`` unit the Ansible role installs instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hvext.cli import common
from hvext.daemon import service


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("daemon", help="run hvextd without systemd (start, stop, restart, reload, status)")
    sub = group.add_subparsers(dest="daemon_command", metavar="ACTION", parser_class=type(group))
    sub.required = True
    for name, text in (("start", "start hvextd detached unless it runs"),
                       ("restart", "stop hvextd if it runs, then start it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path,
                       help=f"hvextd's TOML config (default: {service.CONFIG_FILE} when it exists)")
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        p.add_argument("--wait", type=common.seconds, default=15.0, metavar="S",
                       help="seconds to wait for hvextd to be ready: connected to libvirt (default 15)")
        _add_paths(p)
        p.set_defaults(func=cmd_start if name == "start" else cmd_restart)
    p = sub.add_parser("stop", help="SIGTERM hvextd and wait until it exited")
    p.add_argument("--timeout", type=common.seconds, default=30.0, metavar="S", help="seconds to wait (default 30)")
    _add_paths(p)
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("reload", help="check hvextd's config file, then make hvextd reread it (SIGHUP)")
    _add_paths(p)
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("status", help="whether hvextd runs (exit 0), or not (exit 3)")
    _add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_status)


def _add_paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid-file", type=Path, default=service.PID_FILE, help=argparse.SUPPRESS)
    p.add_argument("--log-file", type=Path, default=service.LOG_FILE, help=argparse.SUPPRESS)


def _config(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return args.config
    return service.CONFIG_FILE if service.CONFIG_FILE.is_file() else None


def cmd_start(args: argparse.Namespace) -> int:
    started = service.start(config=_config(args), uri=args.uri, log_level=args.log_level,
                            pid_file=args.pid_file, log_file=args.log_file, wait_s=args.wait)
    if started.already:
        print(f"hvextd is already running (PID {started.pid})")
    elif started.ready:
        print(f"hvextd started (PID {started.pid}), watching libvirt; log {args.log_file}")
    else:
        print(f"hvextd started (PID {started.pid}), not yet connected to libvirt after {args.wait:.0f} s; "
              f"see {args.log_file}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    pid = service.stop(pid_file=args.pid_file, timeout_s=args.timeout)
    print("hvextd is not running" if pid is None else f"hvextd (PID {pid}) stopped")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    pid, config = service.reload(pid_file=args.pid_file)
    if config is None:
        print(f"hvextd (PID {pid}) runs without a config file: SIGHUP sent, nothing to reload")
    else:
        print(f"{config} is valid; hvextd (PID {pid}) rereads it (SIGHUP); log {args.log_file}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    pid = service.stop(pid_file=args.pid_file)
    if pid is not None:
        print(f"hvextd (PID {pid}) stopped")
    return cmd_start(args)


def cmd_status(args: argparse.Namespace) -> int:
    current = service.status(args.pid_file)

    def text() -> None:
        if current.running:
            print(f"hvextd is running (PID {current.pid}); log {args.log_file}")
        else:
            print("hvextd is not running" + (f" (stale pid file {args.pid_file}: {current.stale})"
                                             if current.stale else ""))

    common.print_result(args.json, current.as_dict() | {"log_file": str(args.log_file)}, text)
    return 0 if current.running else 3
