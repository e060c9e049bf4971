"""Layered fixtures for real guests: built image -> defined domain -> booted domain.

:class:`VMFactory` owns teardown: every domain it made is destroyed and
undefined (with hvext's state) even when a test fails, and the guest console
log of a failed test is kept under ``test-artifacts/``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import aio, image, paths
from hvext.host import Domain, DomainSpec, Host
from tests.vm.cleanup import remove_stale_test_domains

ARTIFACTS = Path(os.environ.get("HVEXT_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
BOOT_TIMEOUT_S = float(os.environ.get("HVEXT_TEST_BOOT_TIMEOUT", "180"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


_NAMES = itertools.count()


class VMFactory:
    """Defines and boots test domains (``hvext-test-<pid>-<n>``) and removes them all at the end."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.domains: list[Domain] = []
        self.boot_seconds: dict[str, float] = {}

    def define(self, memory_mib: int = 512, **spec: object) -> Domain:
        name = f"hvext-test-{os.getpid()}-{next(_NAMES)}"
        domain = self.host.define(DomainSpec(name=name, memory_mib=memory_mib, **spec))  # type: ignore[arg-type]
        self.domains.append(domain)
        return domain

    def boot(self, domain: Domain, *, wait_agent: bool = True) -> Domain:
        started = time.monotonic()
        domain.start()
        if wait_agent:
            aio.run(domain.wait_agent(BOOT_TIMEOUT_S))
            self.boot_seconds[domain.name] = time.monotonic() - started
        return domain

    def keep_logs(self, label: str) -> None:
        for domain in self.domains:
            for log in (paths.LOG_DIR / "console").glob(f"{domain.name}.*.log"):
                target = ARTIFACTS / label.replace("/", "_").replace("::", "-")
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, target / log.name)

    def cleanup(self) -> None:
        errors = []
        for domain in self.domains:
            try:
                if domain.is_active():
                    domain.destroy()
                domain.undefine()
            except Exception as err:  # keep cleaning the others, report at the end
                errors.append(f"{domain.name}: {err}")
        self.domains.clear()
        if errors:
            raise RuntimeError("test VM cleanup failed: " + "; ".join(errors))


@pytest.fixture(scope="session")
def guest_image() -> image.GuestImage:
    return image.build()


@pytest.fixture(scope="session")
def host(guest_image: image.GuestImage) -> Iterator[Host]:
    with Host() as connection:
        remove_stale_test_domains(connection)
        yield connection


@pytest.fixture
def vm_factory(host: Host, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    factory = VMFactory(host)
    yield factory
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        factory.keep_logs(request.node.nodeid)
    factory.cleanup()


def _shared_factory(host: Host, request: pytest.FixtureRequest, label: str) -> Iterator[VMFactory]:
    """A factory whose domains outlive one test; logs are kept when any test meanwhile failed."""
    factory = VMFactory(host)
    failed_before = request.session.testsfailed
    yield factory
    if request.session.testsfailed > failed_before:
        factory.keep_logs(label)
    factory.cleanup()


@pytest.fixture(scope="module")
def vm_factory_module(host: Host, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    """Domains shared by the tests of one module (e.g. a guest with devices attached)."""
    yield from _shared_factory(host, request, request.node.nodeid)


@pytest.fixture(scope="session")
def session_factory(host: Host, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    yield from _shared_factory(host, request, "session")


@pytest.fixture(scope="session")
def booted_vm(session_factory: VMFactory) -> Domain:
    """One guest shared by the session (boots are slow under TCG); agent testing hooks on."""
    return session_factory.boot(session_factory.define(memory_mib=512, agent_testing=True))
