"""The hvext guest agent: newline-delimited JSON over a virtio-serial port.

Wire format (one JSON object per line, both directions)::

    request: {"id": 7, "cmd": "ping", "args": {}}
    reply:   {"id": 7, "ok": true, "result": {...}}
             {"id": 7, "ok": false, "error": {"class": "...", "desc": "..."}}

The host starts every session with ``guest-sync`` carrying a random nonce and
discards whatever it reads before the matching reply (stale replies from an
earlier session), like qemu-ga. Lines longer than ``MAX_LINE`` are dropped;
requests are parsed with bounded nesting and numbers (a hostile host line is
an error reply, never the end of the agent). Replies are never longer than
the host reads (``HOST_MAX_LINE``): ``exec`` output is cut to fit, and any
other oversized reply becomes a ``ReplyTooLong`` error.

The limits mirror ``hvext.agent.protocol`` (MAX_LINE there is HOST_MAX_LINE
here, AGENT_MAX_LINE there is MAX_LINE here); a unit test checks they agree.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hvext_agent import AGENT_VERSION, PORT_NAME, PROTOCOL_VERSION, hints
from hvext_agent.memclass import cmd_memclass

MAX_LINE = 64 * 1024  # longest request line read from the host
HOST_MAX_LINE = 256 * 1024  # longest reply line the host reads
MAX_DEPTH = 32  # deepest nesting of arrays/objects in a request
MAX_INT_DIGITS = 40
WRITE_DEADLINE_S = 5.0


class RequestError(ValueError):
    """A request line is not JSON within the agent's limits."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError("number out of range")
    return value


def _refuse_constant(text: str) -> Any:
    raise RequestError(f"{text} is not JSON")


def _too_deep(value: Any, limit: int) -> bool:
    """True if *value* nests arrays/objects more than *limit* levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_request(line: bytes) -> Any:
    """The JSON value of one request line; RequestError for anything else (never another exception)."""
    try:
        value = json.loads(line, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except RecursionError as err:
        raise RequestError("nested too deeply") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError("not JSON") from err
    if _too_deep(value, MAX_DEPTH):
        raise RequestError(f"nested more than {MAX_DEPTH} levels")
    return value


class CommandError(Exception):
    """A command failed; the reply carries ``error_class`` and the message."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class


def find_port(name: str = PORT_NAME, sysfs: Path = Path("/sys/class/virtio-ports")) -> Path:
    """Return the /dev node of the virtio-serial port called *name*.

    udev is not in the image, so /dev/virtio-ports/<name> may not exist; the
    name is read from sysfs instead.
    """
    link = Path("/dev/virtio-ports") / name
    if link.exists():
        return link
    if sysfs.is_dir():
        for port in sysfs.iterdir():
            try:
                if (port / "name").read_text().strip() == name:
                    return Path("/dev") / port.name
            except OSError:
                continue
    raise FileNotFoundError(f"virtio-serial port {name!r} not found")


def _read_key_values(path: str, *, strip_kb: bool) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path) as handle:
        for line in handle:
            parts = line.replace(":", " ").split()
            if len(parts) >= 2 and parts[1].isdigit():
                values[parts[0]] = int(parts[1])
    return values


def cmd_ping(args: dict[str, Any]) -> dict[str, Any]:
    return {}


def cmd_info(args: dict[str, Any]) -> dict[str, Any]:
    uname = platform.uname()
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return {
        "agent_version": AGENT_VERSION,
        "protocol": PROTOCOL_VERSION,
        "kernel": uname.release,
        "machine": uname.machine,
        "hostname": uname.node,
        "uptime_s": uptime,
        "python": platform.python_version(),
    }


def cmd_meminfo(args: dict[str, Any]) -> dict[str, Any]:
    """Raw /proc/meminfo (kB) and /proc/vmstat (pages and counters)."""
    return {
        "meminfo_kb": _read_key_values("/proc/meminfo", strip_kb=True),
        "vmstat": _read_key_values("/proc/vmstat", strip_kb=False),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
    }


#: JSON bytes each of stdout and stderr may take in an exec reply (the rest of the line is the envelope).
EXEC_OUTPUT_BUDGET = (HOST_MAX_LINE - 4096) // 2
MAX_EXEC_TIMEOUT_S = 600.0


def _fit_tail(data: bytes, budget: int) -> tuple[str, bool]:
    """The longest tail of *data*, as text, whose JSON string takes at most *budget* bytes; and if it was cut.

    JSON escaping can make one byte six (a control byte or an invalid one
    becomes ``\\u00XX`` or ``\\ufffd``), so the cut is measured, not assumed.
    """
    keep = min(len(data), budget)
    while True:
        text = data[len(data) - keep:].decode(errors="replace")
        size = len(json.dumps(text))
        if size <= budget:
            return text, keep < len(data)
        keep = max(0, keep * budget // size - 1)


def cmd_exec(args: dict[str, Any]) -> dict[str, Any]:
    """Run a program and return its status and (capped) output, like qemu-ga's guest-exec.

    The host controls its own guest, so this is not a privilege boundary; it
    exists for tests, benchmarks and workloads started by hvext.
    """
    argv = args.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CommandError("InvalidArguments", "argv must be a non-empty list of strings")
    stdin = args.get("stdin", "")
    timeout = args.get("timeout", 60)
    if not isinstance(stdin, str) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_EXEC_TIMEOUT_S:
        raise CommandError("InvalidArguments", f"stdin must be a string, 0 < timeout <= {MAX_EXEC_TIMEOUT_S}")
    try:
        done = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=timeout,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": "/opt/hvext"})
    except FileNotFoundError as err:
        raise CommandError("ExecFailed", f"{argv[0]}: not found") from err
    except subprocess.TimeoutExpired as err:
        raise CommandError("ExecTimeout", f"{argv[0]} did not finish within {timeout} s") from err
    stdout, stdout_cut = _fit_tail(done.stdout, EXEC_OUTPUT_BUDGET)
    stderr, stderr_cut = _fit_tail(done.stderr, EXEC_OUTPUT_BUDGET)
    return {"exitcode": done.returncode, "stdout": stdout, "stderr": stderr,
            "stdout_truncated": stdout_cut, "stderr_truncated": stderr_cut,
            "stdout_bytes": len(done.stdout), "stderr_bytes": len(done.stderr)}


def _ndctl_namespaces() -> list[dict[str, Any]]:
    out = subprocess.run(["ndctl", "list", "-N"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    data = json.loads(out.stdout)
    return data if isinstance(data, list) else [data]


def _pmem_mounts() -> dict[str, dict[str, Any]]:
    mounts: dict[str, dict[str, Any]] = {}
    with open("/proc/mounts") as handle:
        for line in handle:
            source, target, fstype, options = line.split()[:4]
            if source.startswith("/dev/pmem"):
                opts = options.split(",")
                mounts[source.removeprefix("/dev/")] = {
                    "mountpoint": target, "fstype": fstype,
                    "dax": any(o in ("dax", "dax=always") for o in opts)}
    return mounts


def cmd_pmem(args: dict[str, Any]) -> dict[str, Any]:
    """Persistent-memory namespaces the guest sees, their mode, and DAX mounts."""
    mounts = _pmem_mounts()
    namespaces = []
    for ns in _ndctl_namespaces():
        blockdev = ns.get("blockdev")
        namespaces.append({"namespace": ns.get("dev"), "mode": ns.get("mode"), "size": ns.get("size"),
                           "blockdev": blockdev, "chardev": ns.get("chardev"),
                           "mount": mounts.get(blockdev) if blockdev else None})
    return {"namespaces": namespaces}


def cmd_pmem_mount(args: dict[str, Any]) -> dict[str, Any]:
    """Make a pmem block device usable with DAX: fsdax namespace, ext4 (4 KiB blocks), mount -o dax.

    ``format`` must be true to create a file system (it destroys the device's data);
    without it an existing ext4 file system is mounted as it is.
    """
    blockdev, mountpoint, fmt = args.get("blockdev"), args.get("mountpoint"), args.get("format", False)
    if not isinstance(blockdev, str) or not blockdev.startswith("pmem") or not blockdev[4:].isdigit():
        raise CommandError("InvalidArguments", "blockdev must look like pmem0")
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/") or ".." in mountpoint:
        raise CommandError("InvalidArguments", "mountpoint must be an absolute path")
    if blockdev in _pmem_mounts():
        raise CommandError("Busy", f"{blockdev} is already mounted")
    namespace = next((ns for ns in _ndctl_namespaces() if ns.get("blockdev") == blockdev), None)
    if namespace is None:
        raise CommandError("NotFound", f"no pmem namespace with block device {blockdev}")
    steps = []

    def run(*argv: str) -> None:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
        steps.append(" ".join(argv))
        if done.returncode != 0:
            raise CommandError("SetupFailed", f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")

    if namespace.get("mode") != "fsdax":
        if not fmt:
            raise CommandError("NeedsFormat", f"{blockdev} is in {namespace.get('mode')} mode; "
                               "switching to fsdax needs format=true")
        run("ndctl", "create-namespace", "--force", "--reconfig", namespace["dev"], "--mode", "fsdax")
        namespace = next(ns for ns in _ndctl_namespaces() if ns.get("dev") == namespace["dev"])
        blockdev = namespace["blockdev"]
    if fmt:
        run("mkfs.ext4", "-q", "-F", "-b", "4096", f"/dev/{blockdev}")
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", "-o", "dax", f"/dev/{blockdev}", mountpoint)
    return {"blockdev": blockdev, "mountpoint": mountpoint, "dax": _pmem_mounts()[blockdev]["dax"], "steps": steps}


STRESS_STATUS = "/run/hvext-stress.json"
MAX_STRESS_RATE_MIB = 16 * 1024


class Stress:
    """The one memory-dirtying workload the agent runs at a time (hvext_agent.stress)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        rate, wss, seconds = args.get("rate_mib_s"), args.get("wss_mib"), args.get("seconds", 0)
        total_mib = _read_key_values("/proc/meminfo", strip_kb=True).get("MemTotal", 0) // 1024
        if not isinstance(rate, (int, float)) or not 0 < rate <= MAX_STRESS_RATE_MIB:
            raise CommandError("InvalidArguments", f"rate_mib_s must be in (0, {MAX_STRESS_RATE_MIB}]")
        if not isinstance(wss, int) or not 1 <= wss <= total_mib * 0.8:
            raise CommandError("InvalidArguments", f"wss_mib must be 1 to 80% of guest memory ({total_mib} MiB)")
        if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 24 * 3600:
            raise CommandError("InvalidArguments", "seconds must be 0 (until stopped) to 86400")
        self.stop({})
        try:
            os.unlink(STRESS_STATUS)  # a new run must not be judged by the previous run's status
        except FileNotFoundError:
            pass
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hvext_agent.stress", "--rate-mib", str(rate), "--wss-mib", str(wss),
             "--seconds", str(seconds), "--status", STRESS_STATUS],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PYTHONPATH": "/opt/hvext", "PATH": "/usr/bin:/bin"})
        return {"pid": self.process.pid}

    def status(self, args: dict[str, Any]) -> dict[str, Any]:
        running = self.process is not None and self.process.poll() is None
        try:
            with open(STRESS_STATUS) as handle:
                report = json.load(handle)
        except (OSError, ValueError):
            report = {}
        report["running"] = running
        return report

    def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        return {}


def _bounded(value: Any, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise CommandError("InvalidArguments", f"expected a number from {low} to {high}")
    return float(value)


class Agent:
    """Serves requests on one port file descriptor."""

    def __init__(self, fd: int, *, testing: bool = False) -> None:
        self.fd = fd
        self.testing = testing
        self.buffer = bytearray()
        self.discarding = False
        self.misbehave: str | None = None
        self.stress = Stress()
        self.commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": cmd_ping,
            "info": cmd_info,
            "meminfo": cmd_meminfo,
            "exec": cmd_exec,
            "pmem": cmd_pmem,
            "pmem-mount": cmd_pmem_mount,
            "memclass": cmd_memclass,
            "pmem-hints": lambda args: hints.resolve(),
            "pmem-freeze": lambda args: hints.freeze(_bounded(args.get("timeout", 3.0), 0.0, 30.0)),
            "pmem-thaw": lambda args: hints.thaw(),
            "stress-start": self.stress.start,
            "stress-status": self.stress.status,
            "stress-stop": self.stress.stop,
        }

    # -- output ---------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Write all of *data* or give up after WRITE_DEADLINE_S (host gone)."""
        deadline = time.monotonic() + WRITE_DEADLINE_S
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
                view = view[written:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return
                select.poll().poll(50)
            except OSError as err:
                if err.errno in (errno.EPIPE, errno.ENODEV, errno.EIO):
                    return
                raise

    def send(self, message: dict[str, Any]) -> None:
        """Send one reply; one the host could not read (over HOST_MAX_LINE) becomes a ReplyTooLong error."""
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(line) > HOST_MAX_LINE:
            request_id = message.get("id")
            if not isinstance(request_id, (int, str)) or len(str(request_id)) > 64:
                request_id = None  # a huge id would not fit either
            line = json.dumps({"id": request_id, "ok": False, "error": {
                "class": "ReplyTooLong", "desc": f"the reply of {len(line)} bytes is over the host's "
                                                 f"limit of {HOST_MAX_LINE}"}}).encode() + b"\n"
        self.send_raw(line)

    # -- input ----------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Add bytes from the port and handle every complete line."""
        self.buffer += chunk
        while True:
            newline = self.buffer.find(b"\n")
            if newline < 0:
                if len(self.buffer) > MAX_LINE:
                    self.buffer.clear()
                    self.discarding = True
                return
            line = bytes(self.buffer[:newline])
            del self.buffer[: newline + 1]
            if self.discarding:
                self.discarding = False
                self.send({"id": None, "ok": False, "error": {"class": "LineTooLong", "desc": "request line too long"}})
                continue
            self.handle_line(line)

    def handle_line(self, line: bytes) -> None:
        line = line.strip().lstrip(b"\xff")
        if not line:
            return
        try:
            request = parse_request(line)
        except RequestError as err:
            self.send({"id": None, "ok": False, "error": {"class": "ParseError", "desc": str(err)}})
            return
        if not isinstance(request, dict):
            self.send({"id": None, "ok": False, "error": {"class": "ParseError", "desc": "not an object"}})
            return
        request_id = request.get("id")
        if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
            request_id = None
        try:
            result = self.dispatch(request)
        except CommandError as err:
            self.send({"id": request_id, "ok": False, "error": {"class": err.error_class, "desc": str(err)}})
            return
        except Exception as err:  # a broken command must not kill the agent
            self.send({"id": request_id, "ok": False, "error": {"class": "InternalError", "desc": repr(err)}})
            return
        if self.misbehave and request.get("cmd") != "x-test-misbehave":
            self.send_misbehaving(request_id, result)
            return
        reply = {"id": request_id, "ok": True, "result": result}
        if request.get("cmd") == "guest-sync":
            # A leading newline ends whatever partial line an earlier agent left in the
            # channel, so the host can never see the sync reply glued to old bytes.
            self.send_raw(b"\n" + json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        else:
            self.send(reply)

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise CommandError("InvalidArguments", "args must be an object")
        if cmd == "guest-sync":
            nonce = args.get("nonce")
            if not isinstance(nonce, int) or isinstance(nonce, bool):
                raise CommandError("InvalidArguments", "nonce must be an integer")
            self.misbehave = None
            return {"nonce": nonce, "protocol": PROTOCOL_VERSION, "agent_version": AGENT_VERSION,
                    "commands": sorted(self.commands) + ["guest-sync"]}
        if cmd == "x-test-misbehave" and self.testing:
            mode = args.get("mode")
            if mode not in ("garbage", "huge", "silence", "wrong-id", "bad-schema", None):
                raise CommandError("InvalidArguments", f"unknown mode {mode!r}")
            self.misbehave = mode
            return {"mode": mode}
        handler = self.commands.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            raise CommandError("CommandNotFound", f"unknown command {cmd!r}")
        return handler(args)

    def send_misbehaving(self, request_id: Any, result: dict[str, Any]) -> None:
        """Test-only: answer the next request the way a hostile guest might."""
        mode, self.misbehave = self.misbehave, None
        if mode == "garbage":
            self.send_raw(b"\x00\x01not json at all {{{\n")
        elif mode == "huge":
            self.send_raw(b'{"id": ' + str(request_id).encode() + b', "ok": true, "result": "' + b"A" * (4 * 1024 * 1024) + b'"}\n')
        elif mode == "wrong-id":
            self.send({"id": "not-yours", "ok": True, "result": result})
        elif mode == "bad-schema":
            self.send({"id": request_id, "ok": "yes", "result": [1, 2, 3]})
        # "silence": no reply at all

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            _, mask = events[0]
            if mask & select.POLLIN:
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    self.feed(chunk)
                    continue
            # host side not connected: virtio-serial reports POLLHUP / EOF
            self.buffer.clear()
            time.sleep(0.2)


def kernel_flag(name: str) -> bool:
    try:
        return name in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


def main() -> int:
    testing = kernel_flag("hvext_agent.testing=1")
    port = None
    for _ in range(100):
        try:
            port = find_port()
            break
        except FileNotFoundError:
            time.sleep(0.1)
    if port is None:
        print("hvext-agent: no port " + PORT_NAME, file=sys.stderr, flush=True)
        return 1
    fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    print(f"hvext-agent: ready on {port} (version {AGENT_VERSION})", flush=True)
    Agent(fd, testing=testing).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
