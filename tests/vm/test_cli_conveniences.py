"""Shell completion of real domain names, and `hvext list --json` into a closed pipe.

The domains are defined, never booted (no guest needed); the console script
runs in a subprocess as the shell runs it (tests/clirun.py).
"""

from __future__ import annotations

from hvext.cli.main import EXIT_BROKEN_PIPE
from tests.clirun import complete, into_closed_pipe
from tests.vm.conftest import VMFactory


def test_domain_names_complete_from_the_connection(vm_factory: VMFactory) -> None:
    first, second = vm_factory.define(), vm_factory.define()
    prefix = first.name.rsplit("-", 1)[0] + "-"  # hvext-test-<pid>-: this run's domains only
    for line, extra in ((f"hvext dominfo {prefix}", {}),
                        (f"hvext -c qemu:///system memclass {prefix}", {}),
                        (f"hvext --connect qemu:///system power protect {prefix}", {}),
                        (f"hvext dirtylog {prefix}", {"LIBVIRT_DEFAULT_URI": "qemu:///system"})):
        candidates, err, status = complete(line, **extra)
        assert (err, status) == ("", 0), line
        assert {first.name, second.name} <= set(candidates) and all(c.startswith(prefix) for c in candidates), line
    candidates, _, _ = complete(f"hvext start {first.name}")
    assert candidates == [first.name]


def test_list_json_into_a_closed_pipe_ends_quietly(vm_factory: VMFactory) -> None:
    vm_factory.define()
    proc = into_closed_pipe("list", "--all", "--json")
    assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, "")
