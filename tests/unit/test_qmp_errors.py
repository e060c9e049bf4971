"""QMP errors keep QEMU's error class and description (hvext.qmp), not only a message.

A command QEMU refuses becomes a QMPError whose ``error_class`` and ``desc``
are QEMU's: from a real QEMU (``-machine none``, no guest) on a monitor socket,
and from replies libvirt passes through (QEMU's text, untrusted).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.errors import QMPError
from hvext.qmp import MAX_ERROR_TEXT, SocketQMP, passthrough_result
from tests.support import require


@pytest.mark.parametrize("raw,error_class,desc", [
    ('{"error": {"class": "DeviceNotFound", "desc": "Device \'x\' not found"}}', "DeviceNotFound",
     "Device 'x' not found"),
    ('{"error": {"class": "GenericError"}}', "GenericError", None),
    ('{"error": {"class": 7, "desc": ["no"]}}', None, None),  # not strings: not kept
    ('{"error": "just text"}', None, None),
])
def test_a_passed_through_error_keeps_qemus_class_and_description(raw: str, error_class: str | None,
                                                                  desc: str | None) -> None:
    with pytest.raises(QMPError, match="^QMP device_del failed: ") as caught:
        passthrough_result("device_del", raw)
    assert (caught.value.error_class, caught.value.desc) == (error_class, desc)


def test_a_huge_description_is_capped_on_the_error() -> None:
    with pytest.raises(QMPError) as caught:
        passthrough_result("x", '{"error": {"class": "GenericError", "desc": "%s"}}' % ("d" * 5000))
    assert caught.value.desc == "d" * MAX_ERROR_TEXT


def test_errors_that_are_not_qemus_refusals_carry_no_class() -> None:
    for raw in ('[1]', '{"neither": 1}', "not json"):
        with pytest.raises(QMPError) as caught:
            passthrough_result("x", raw)
        assert caught.value.error_class is None and caught.value.desc is None


@pytest.fixture
def qemu_monitor(tmp_path: Path) -> Iterator[Path]:
    """A real QEMU without a machine (nothing boots), serving QMP on a socket; stopped afterwards."""
    binary = shutil.which("qemu-system-x86_64")
    require(binary, "needs qemu-system-x86_64 (setup installs it)")
    socket = tmp_path / "qmp.sock"
    process = subprocess.Popen([str(binary), "-machine", "none", "-nodefaults", "-display", "none", "-S",
                                "-qmp", f"unix:{socket},server=on,wait=off"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read() if process.poll() is not None else b""  # type: ignore[union-attr]
                raise AssertionError(f"QEMU did not open its monitor: {stderr!r}")
            time.sleep(0.05)
        yield socket
    finally:
        process.kill()
        process.wait()
        process.stderr.close()  # type: ignore[union-attr]


def test_a_command_qemu_refuses_keeps_qemus_class_and_description(qemu_monitor: Path) -> None:
    async def session() -> list[QMPError]:
        errors = []
        deadline = time.monotonic() + 30
        while True:  # QEMU creates the socket file a moment before it listens on it
            try:
                qmp = await SocketQMP(qemu_monitor, name="unit").connect()
                break
            except QMPError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        async with qmp:
            for command, arguments in (("device_del", {"id": "hvext-unit-nothing"}), ("x-hvext-no-such", None)):
                with pytest.raises(QMPError) as caught:
                    await qmp.execute(command, arguments)
                errors.append(caught.value)
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"  # the session goes on
        return errors
    removed, unknown = asyncio.run(session())
    assert removed.error_class == "DeviceNotFound" and "hvext-unit-nothing" in (removed.desc or "")
    assert str(removed) == f"QMP device_del failed: {removed.desc}"  # the message is as before
    assert unknown.error_class == "CommandNotFound" and "x-hvext-no-such" in (unknown.desc or "")
