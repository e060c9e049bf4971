"""The layering, as import rules read from the source with ``ast`` (docs: /work/shared/ARCHITECTURE.md):

* the guest agent uses only the standard library, its own package and what ships in the guest image
  of the host package (``hvext.rvm`` and what it needs);
* ``hvext.rvm`` uses only the standard library (it runs in the guest);
* nothing outside ``hvext/cli`` imports the CLI;
* libvirt is imported only by ``hvext/host.py``, the lab's process management and the exceptions
  listed below, and no module reaches into the libvirt handles of Host/Domain (``.dom``, ``.conn``);
* only ``hvext/agent`` sends a request to the guest agent by its command name (``.request("info")``):
  everyone else calls the agent client's typed methods, which check what comes back.
"""

from __future__ import annotations

import ast
import re
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

from hvext import image

ROOT = Path(__file__).resolve().parents[2]
HVEXT = ROOT / "hvext"
GUEST_AGENT = ROOT / "guest-agent"

#: Modules of the host package that ship in the guest image (hvext/image.py copies them), so the
#: guest agent and hvext.rvm may import them: all standard-library only.
GUEST_SIDE = {"hvext": "the package (its __init__ imports only hvext.errors)",
              "hvext.errors": "the error tree, standard-library only, copied into the guest image",
              "hvext.durable": "durable-file mechanics (unique temp name, fsync, rename), standard-library only"}
#: Who may import libvirt (libvirt, libvirt_qemu, libvirtaio), and why.
LIBVIRT_IMPORTERS = {
    "hvext/host.py": "Host and Domain hold the libvirt handles and translate libvirt's errors (translate)",
    "hvext/aio.py": "registers libvirt's event implementation (libvirtaio) on hvext's shared loop, once "
                    "per process and before any connection opens",
    "hvext/lab/": "the lab's process management: probes and stops each lab host's own libvirtd",
}
LIBVIRT_MODULES = {"libvirt", "libvirt_qemu", "libvirtaio"}
#: Attributes of Host/Domain that are libvirt handles.
HANDLE_ATTRIBUTES = {"dom", "conn", "_dom"}
#: Tests of the raw agent protocol (unknown commands, misbehaviour on request) may send commands by name.
RAW_PROTOCOL_TESTS = {"tests/unit/test_agent_protocol.py", "tests/vm/test_foundation.py"}


def sources(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> str:
    """``hvext/pmem/power.py`` -> ``hvext.pmem.power`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "guest-agent":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_hvext_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of each import in *path*, anywhere in it; ``from X import a`` counts as ``X.a``
    when that is a module of the host package, else as ``X``."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if is_hvext_module(submodule) else base


def is_standard_library(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def guest_side(name: str) -> bool:
    return name in GUEST_SIDE or name == "hvext.rvm" or name.startswith("hvext.rvm.")


def test_the_guest_agent_uses_only_what_ships_in_the_guest() -> None:
    """Followed through the host package: what hvext.rvm imports must ship in the guest too."""
    bad = []
    for path in sources(GUEST_AGENT):
        for line, name in imports(path):
            top = name.split(".")[0]
            if top == "hvext" and not guest_side(name):
                bad.append(f"{where(path, line)} imports {name}")
            elif top not in ("hvext", "hvext_agent") and not is_standard_library(name):
                bad.append(f"{where(path, line)} imports {name} (not standard library)")
    seen: set[str] = set()
    todo = [name for path in sources(GUEST_AGENT) for _, name in imports(path) if name.split(".")[0] == "hvext"]
    while todo:
        name = todo.pop()
        if name in seen or not is_hvext_module(name):
            continue
        seen.add(name)
        relative = Path(*name.split("."))
        path = (ROOT / relative).with_suffix(".py")
        path = path if path.is_file() else ROOT / relative / "__init__.py"
        for line, imported in imports(path):
            if imported.split(".")[0] == "hvext":
                if guest_side(imported):
                    todo.append(imported)
                else:
                    bad.append(f"{where(path, line)} imports {imported}, which the guest does not have")
            elif not is_standard_library(imported):
                bad.append(f"{where(path, line)} imports {imported} (not standard library), and runs in the guest")
    assert "hvext.rvm" in seen  # the walk followed the agent into the host package
    shipped = {inside for _, inside in image._guest_files()}
    for name in sorted(seen):  # and the image builder copies every module the walk reached
        relative = Path(*name.split("."))
        file = relative.with_suffix(".py") if (ROOT / relative).with_suffix(".py").is_file() else relative / "__init__.py"
        if f"opt/hvext/{file.as_posix()}" not in shipped:
            bad.append(f"{name} runs in the guest, but hvext/image.py does not copy {file} into the image")
    assert not bad, "\n".join(bad)


def test_rvm_uses_only_the_standard_library() -> None:
    bad = [f"{where(path, line)} imports {name}" for path in sources(HVEXT / "rvm") for line, name in imports(path)
           if not is_standard_library(name) and not guest_side(name)]
    assert not bad, "\n".join(bad)


def test_nothing_outside_the_cli_imports_it() -> None:
    bad = [f"{where(path, line)} imports {name}" for path in sources(HVEXT) + sources(GUEST_AGENT)
           if not path.is_relative_to(HVEXT / "cli")
           for line, name in imports(path) if name == "hvext.cli" or name.startswith("hvext.cli.")]
    assert not bad, "\n".join(bad)


def libvirt_allowed(path: Path) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == allowed or (allowed.endswith("/") and relative.startswith(allowed))
               for allowed in LIBVIRT_IMPORTERS)


def test_only_host_and_the_lab_import_libvirt() -> None:
    bad = [f"{where(path, line)} imports {name}" for path in sources(HVEXT) + sources(GUEST_AGENT)
           if not libvirt_allowed(path)
           for line, name in imports(path) if name.split(".")[0] in LIBVIRT_MODULES]
    assert not bad, "libvirt outside hvext/host.py (add a Host/Domain method instead):\n" + "\n".join(bad)
    for allowed in LIBVIRT_IMPORTERS:  # every exception still exists (a stale one hides nothing)
        assert (ROOT / allowed).exists(), allowed


def test_nothing_reaches_into_the_libvirt_handles_of_host_and_domain() -> None:
    bad = []
    for path in sources(HVEXT):
        if path == HVEXT / "host.py":
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute) and node.attr in HANDLE_ATTRIBUTES:
                bad.append(f"{where(path, node.lineno)}: {ast.unparse(node)}")
    assert not bad, "libvirt handles used outside hvext/host.py (add a Host/Domain method):\n" + "\n".join(bad)


@functools.cache
def agent_commands() -> frozenset[str]:
    """The commands the guest agent serves (its dispatch table, and the ones it handles itself)."""
    sys.path.insert(0, str(GUEST_AGENT))
    try:
        from hvext_agent.agent import Agent
    finally:
        sys.path.remove(str(GUEST_AGENT))
    return frozenset(Agent(-1, testing=True).commands) | {"guest-sync", "x-test-misbehave"}


def literal_requests(path: Path) -> Iterator[str]:
    """``.request("name", ...)`` calls in *path* naming a guest-agent command: a command sent by its
    name, not by a typed method (other ``request`` methods, such as http.client's, are no concern)."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "request" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in agent_commands():
            yield f"{where(path, node.lineno)}: {ast.unparse(node)}"


def test_only_the_agent_package_sends_agent_commands_by_name() -> None:
    checked = [p for p in sources(HVEXT) + sources(ROOT / "bench") + sources(ROOT / "tests")
               if not p.is_relative_to(HVEXT / "agent") and p.relative_to(ROOT).as_posix() not in RAW_PROTOCOL_TESTS]
    bad = [call for path in checked for call in literal_requests(path)]
    assert not bad, "agent commands sent by name (add a typed method to AgentClient):\n" + "\n".join(bad)
    assert {"meminfo", "memclass", "pmem-mount"} <= agent_commands()
    assert any(literal_requests(HVEXT / "agent" / "client.py"))  # the rule sees what it forbids
    for allowed in RAW_PROTOCOL_TESTS:
        assert (ROOT / allowed).exists(), allowed


UNIT_NAMES = {"KIB", "MIB", "GIB", "TIB"}


def test_the_size_units_are_defined_once_on_the_host_side() -> None:
    """KIB/MIB/GIB/TIB live in hvext/units.py; a copy elsewhere in hvext or bench could drift from it."""
    bad = []
    for path in sources(HVEXT) + sources(ROOT / "bench"):
        if path == HVEXT / "units.py":
            continue
        for node in ast.walk(parse(path)):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            bad += [f"{where(path, node.lineno)}: {ast.unparse(t)}" for t in targets
                    if isinstance(t, ast.Name) and t.id in UNIT_NAMES]
    assert not bad, "size units defined outside hvext/units.py (import them from there):\n" + "\n".join(bad)


#: A sentence of a module's docstring that says it is standard-library only ("Standard library only.",
#: "This module is standard-library only ..."), not one that says so of something else.
_STDLIB_CLAIM = re.compile(r"This (?:module|package) (?:is|stays) standard[- ]library only"
                           r"|(?:^|(?<=[.:)]\s))standard[- ]library only", re.IGNORECASE)


def stdlib_claim(path: Path) -> bool:
    docstring = ast.get_docstring(parse(path)) or ""
    return bool(_STDLIB_CLAIM.search(" ".join(docstring.split())))


def test_modules_saying_standard_library_only_are() -> None:
    """A docstring saying "standard library only" is true: the module (a package's ``__init__``: the
    whole package, unless it says "This module") imports only the standard library, its own package
    and hvext modules that say so themselves."""
    claims = {}
    for path in sources(HVEXT):
        if stdlib_claim(path):
            claims[module_of(path)] = path
    assert {"hvext.errors", "hvext.durable", "hvext.rvm"} <= set(claims)  # the claims are recognised
    bad = []
    for name, path in claims.items():
        docstring = (ast.get_docstring(parse(path)) or "").lower()
        package_wide = path.name == "__init__.py" and "this module" not in docstring
        for file in sources(path.parent) if package_wide else [path]:
            for line, imported in imports(file):
                if is_standard_library(imported) or (package_wide and imported.startswith(f"{name}.")):
                    continue
                relative = Path(*imported.split("."))
                target = (ROOT / relative).with_suffix(".py")
                target = target if target.is_file() else ROOT / relative / "__init__.py"
                if not (imported.split(".")[0] == "hvext" and target.is_file() and stdlib_claim(target)):
                    bad.append(f"{where(file, line)} imports {imported}, but {name} says it is standard-library only")
    assert not bad, "\n".join(bad)
