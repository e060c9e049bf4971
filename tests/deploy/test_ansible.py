"""The Ansible role ``hvext_host`` (ansible/) applied to this machine with ``connection=local``.

Three runs of ansible/site.yml: the first may change things; the second must
report ``changed=0``; the third, after one variable changed (hvextd's reclaim
floor), must change exactly the config file and reload hvextd (SIGHUP: same
PID, the new floor in force). libvirtd is never restarted (its PID stays). The machine must be set up (``make setup``):
the image and QEMU steps are then cache hits, and the runs take seconds.

The hvextd the role starts can touch nobody's VM: its reclaim loop only
considers a domain that does not exist, and its state directory (power
registry, pools) is private to the test. Cleanup restores the config, the
unit and the daemon as they were.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvext import image, paths
from hvext.daemon import config as daemon_config
from hvext.daemon import service
from hvext.daemon.config import MetricsConfig
from hvext.errors import HvextError
from tests.support import require

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = BIN / "ansible-playbook"
LINT = BIN / "ansible-lint"
UNIT = Path("/etc/systemd/system/hvextd.service")
NOBODY = "hvext-ansible-test-none"
HEADER = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?P<name>.+?)\]")
RESULT = re.compile(r"^(?P<status>changed|ok|skipping|failed|fatal): \[localhost\]")
RECAP = re.compile(r"^localhost\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=0\s+failed=0")


def systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def ansible_env(home: Path) -> dict[str, str]:
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "LC_ALL": "C.UTF-8",
                         "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_HOME": str(home),
                         "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_REMOTE_TEMP": str(home / "tmp"),
                         "ANSIBLE_RETRY_FILES_ENABLED": "0"}


@dataclass
class Run:
    output: str
    changed: int
    changed_tasks: list[str]


def play(vars_file: Path, home: Path) -> Run:
    proc = subprocess.run([str(PLAYBOOK), "-i", "inventory/local.ini", "site.yml", "-e", f"@{vars_file}"],
                          cwd=ANSIBLE_DIR, env=ansible_env(home), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    task, changed_tasks, recap = "", [], None
    for line in proc.stdout.splitlines():
        if m := HEADER.match(line):
            task = m["name"]
        elif (m := RESULT.match(line)) and m["status"] == "changed" and task not in changed_tasks:
            changed_tasks.append(task)
        elif m := RECAP.match(line):
            recap = int(m["changed"])
    assert recap is not None, output[-4000:]
    return Run(output, recap, changed_tasks)


def libvirtd_pid() -> str | None:
    try:
        return Path("/run/libvirtd.pid").read_text().strip()
    except FileNotFoundError:
        return None


def hvextd_pid() -> int | None:
    if systemd():
        out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "hvextd.service"],
                             capture_output=True, text=True).stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None
    return service.status().pid


def setup_done() -> bool:
    """Whether the guest image and the patched QEMU are built (the role's slow steps are then cache hits)."""
    try:
        return image.find_image() is not None and paths.PATCHED_QEMU.resolve(strict=True).is_file()
    except (OSError, HvextError):
        return False


@dataclass
class Before:
    config: bytes | None
    config_dir: bool
    unit: bytes | None
    running: bool
    log: bool
    run_dir: bool


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Path]:
    """Requirements, then what the role may change, restored afterwards."""
    require(os.geteuid() == 0, "the role configures the machine: run as root")
    require(PLAYBOOK.is_file(), f"{PLAYBOOK} missing: ansible-core is in the test extras (make venv)")
    require(subprocess.run(["virsh", "-q", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0,
            "libvirtd does not answer (setup/host.sh libvirtd)")
    require(setup_done(), "guest image or patched QEMU missing (make setup builds them; the role would take "
                          "many minutes to build them here)")
    config = service.CONFIG_FILE
    before = Before(config=config.read_bytes() if config.exists() else None, config_dir=config.parent.exists(),
                    unit=UNIT.read_bytes() if UNIT.exists() else None, running=hvextd_pid() is not None,
                    log=service.LOG_FILE.exists(), run_dir=service.RUN_DIR.exists())
    try:
        yield tmp_path
    finally:
        if before.config is None:
            config.unlink(missing_ok=True)
            if not before.config_dir and config.parent.is_dir() and not any(config.parent.iterdir()):
                config.parent.rmdir()
        else:
            config.write_bytes(before.config)
        if systemd():
            if before.unit is None:
                subprocess.run(["systemctl", "disable", "--now", "hvextd.service"], capture_output=True)
                UNIT.unlink(missing_ok=True)
            else:
                UNIT.write_bytes(before.unit)
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
            if before.running:
                subprocess.run(["systemctl", "restart", "hvextd.service"], capture_output=True)
        else:
            service.stop()
            if before.running:
                service.start(config=config if config.exists() else None)
        if not before.log and not before.running:
            service.LOG_FILE.unlink(missing_ok=True)
        if not before.run_dir and service.RUN_DIR.is_dir():
            (service.RUN_DIR / "hvextd.lock").unlink(missing_ok=True)
            if not any(service.RUN_DIR.iterdir()):
                service.RUN_DIR.rmdir()


def venv_is_current() -> bool:
    """Whether `make venv` of this checkout has nothing to do for the running virtualenv.

    Only then does the test let the role manage it: the role must never
    reinstall the virtualenv this test (and maybe others) runs from.
    """
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    return venv == ROOT / ".venv" and stamp.exists() and \
        stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime


def test_role_is_idempotent_and_a_changed_variable_changes_only_its_dependents(machine: Path) -> None:
    variables = {
        "hvext_host_src_dir": str(ROOT),
        "hvext_host_venv": sys.prefix,
        "hvext_host_venv_manage": venv_is_current(),
        "hvext_host_reclaim_domains": [NOBODY],
        "hvext_host_reclaim_host_available_min_mib": 1,
        "hvext_host_daemon_environment": {"HVEXT_STATE_DIR": str(machine / "state")},
    }
    (machine / "state").mkdir()
    vars_file = machine / "vars.json"
    vars_file.write_text(json.dumps(variables))
    home = machine / "ansible-home"
    libvirtd = libvirtd_pid()

    play(vars_file, home)
    first_pid = hvextd_pid()
    assert first_pid is not None, "the role did not leave hvextd running"
    assert "host_available_min_mib = 1" in service.CONFIG_FILE.read_text()

    second = play(vars_file, home)
    assert second.changed == 0 and second.changed_tasks == [], second.output[-4000:]
    assert hvextd_pid() == first_pid

    variables["hvext_host_reclaim_host_available_min_mib"] = 2
    vars_file.write_text(json.dumps(variables))
    log_offset = service.LOG_FILE.stat().st_size if not systemd() else 0
    third = play(vars_file, home)
    reload = "Reload hvextd (systemd)" if systemd() else "Reload hvextd (without systemd)"
    assert third.changed_tasks == ["hvext_host : Install the hvextd configuration", f"hvext_host : {reload}"], \
        third.output[-4000:]
    assert third.changed == 2
    assert "host_available_min_mib = 2" in service.CONFIG_FILE.read_text()
    assert hvextd_pid() == first_pid, "a changed config restarted hvextd instead of reloading it"
    if not systemd():
        deadline = time.monotonic() + 30
        while b"SIGHUP: reloaded" not in (log := service.LOG_FILE.read_bytes()[log_offset:]):
            assert time.monotonic() < deadline, log.decode(errors="replace")
            time.sleep(0.1)
        assert b"host_available_min_mib=2," in log
    assert libvirtd_pid() == libvirtd, "the role restarted libvirtd although its config did not change"


def test_ansible_lint_is_clean_offline(tmp_path: Path) -> None:
    require(LINT.is_file(), f"{LINT} missing: ansible-lint is in the test extras (make venv)")
    env = ansible_env(tmp_path) | {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([str(LINT), "--offline", "-q", "site.yml", "roles/hvext_host"], cwd=ANSIBLE_DIR,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_the_unit_and_config_templates_render(tmp_path: Path) -> None:
    """The systemd unit (not exercised on this systemd-less machine) and the config, rendered by Ansible."""
    require(PLAYBOOK.is_file(), f"{PLAYBOOK} missing: ansible-core is in the test extras (make venv)")
    out = tmp_path / "out"
    playbook = tmp_path / "render.yml"
    playbook.write_text(f"""---
- name: Render the role's templates
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ANSIBLE_DIR}/roles/hvext_host/defaults/main.yml
    - {tmp_path}/overrides.yml
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{ANSIBLE_DIR}/roles/hvext_host/templates/{{{{ item }}}}.j2"
        dest: "{out}/{{{{ item }}}}"
        mode: "0644"
      loop: [hvextd.service, hvextd.toml, hvext-etcd.service]
""")
    (tmp_path / "overrides.yml").write_text("""---
hvext_host_src_dir: /opt/hvext/src
hvext_host_daemon_uri: qemu+ssh://peer/system
hvext_host_daemon_environment: {HVEXT_STATE_DIR: /srv/hvext}
hvext_host_etcd_endpoints: ["https://192.0.2.1:2379"]
hvext_host_cluster_name: lab
""")
    out.mkdir()
    proc = subprocess.run([str(PLAYBOOK), "-i", "localhost,", "-c", "local", "-e",
                           f"ansible_python_interpreter={sys.executable}", str(playbook)],
                          env=ansible_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    unit = (out / "hvextd.service").read_text()
    assert "ExecStart=/opt/hvext/src/.venv/bin/hvextd -c qemu+ssh://peer/system --config /etc/hvext/hvextd.toml " \
           "--log-level INFO\n" in unit
    assert 'Environment="HVEXT_STATE_DIR=/srv/hvext"\n' in unit
    assert "Restart=on-failure\n" in unit and "Type=notify\n" in unit and "SIGPWR" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in unit and "NotifyAccess=main\n" in unit
    # this host's etcd member starts first, and only on a member (docs/ha.md, "At boot")
    assert "After=libvirtd.service virtlogd.service hvext-etcd.service\n" in unit
    etcd_unit = (out / "hvext-etcd.service").read_text()
    assert "ConditionPathExists=/srv/hvext/ha/member.json\n" in etcd_unit and "Before=hvextd.service\n" in etcd_unit
    assert "ExecStart=/opt/hvext/src/.venv/bin/hvext cluster start\n" in etcd_unit
    assert "PIDFile=/run/hvext/etcd.pid\n" in etcd_unit
    config = tomllib.loads((out / "hvextd.toml").read_text())
    assert config["power"] == {"budget": 5}
    loaded = daemon_config.load(out / "hvextd.toml")  # what hvextd accepts (unknown sections or keys are refused)
    assert loaded.get(MetricsConfig) == MetricsConfig(enabled=True, address="127.0.0.1", port=9177)
    assert config["reclaim"] == {"interval_s": 10, "host_available_min_mib": 2048, "step_mib": 256, "method": "auto"}
    assert config["ha"] == {"cluster": "lab", "etcd_endpoints": ["https://192.0.2.1:2379"]}
    assert config["metrics"] == {"address": "127.0.0.1", "port": 9177, "allow_remote": False}


def test_patched_qemu_copied_from_the_controller(tmp_path: Path) -> None:
    """hvext_host_qemu_artifact: the role's copy-and-link path, into paths private to the test."""
    require(PLAYBOOK.is_file(), f"{PLAYBOOK} missing: ansible-core is in the test extras (make venv)")
    require(setup_done(), "patched QEMU missing (make qemu)")
    artifact = paths.PATCHED_QEMU.resolve(strict=True)
    link = tmp_path / "lib" / "qemu-system-x86_64"
    playbook = tmp_path / "qemu.yml"
    playbook.write_text(f"""---
- name: Install the patched QEMU from a controller-side artifact
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The role's QEMU tasks
      ansible.builtin.include_role:
        name: hvext_host
        tasks_from: qemu.yml
      vars:
        hvext_host_qemu_artifact: {artifact}
        hvext_host_qemu_artifact_dir: {tmp_path}/artifact
        hvext_host_qemu_link: {link}
""")
    env = ansible_env(tmp_path / "home") | {"ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    command = [str(PLAYBOOK), "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
               str(playbook)]
    changed = []
    for _ in range(2):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        changed.append(int(re.search(r"changed=(\d+)", proc.stdout)[1]))  # type: ignore[index]
    assert changed == [3, 0]  # the directories, the copy, the link; then nothing
    assert link.resolve() == tmp_path / "artifact" / "qemu-system-x86_64"
    assert link.read_bytes() == artifact.read_bytes() and os.access(link, os.X_OK)
