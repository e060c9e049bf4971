"""hvextd's metrics: the [metrics] config section, the collector's pure parts, one domain's failure
isolated (on libvirt's test driver), and the Grafana dashboard's expressions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hvext.daemon import metrics
from hvext.daemon import config as daemon_config
from hvext.daemon.config import MetricsConfig
from hvext.domxml import HVEXT_NS
from hvext.errors import QMPError, UsageError
from hvext.memory import balloon, classes
from hvext.memory.pools import PoolStore
from hvext.pmem import power
from hvext.pmem.store import Store
from hvext.units import KIB, MIB
from tests.unit.testdriver import PLAIN_XML, running_domain

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "hvext.json"


def load_metrics(path: Path) -> MetricsConfig | None:
    return daemon_config.load(path).get(MetricsConfig)


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hvextd.toml"
    path.write_text(text)
    return path


# -- [metrics] ----------------------------------------------------------------------------------


def test_no_metrics_section_serves_nothing_and_a_section_serves_loopback(tmp_path: Path) -> None:
    assert load_metrics(config(tmp_path, "[power]\nbudget = 1\n")) == MetricsConfig(enabled=False)
    assert load_metrics(config(tmp_path, "[metrics]\n")) == MetricsConfig(enabled=False)  # empty: as absent
    loaded = load_metrics(config(tmp_path, "[metrics]\nport = 9200\n"))
    assert loaded == MetricsConfig(enabled=True, address="127.0.0.1", port=9200)
    assert load_metrics(config(tmp_path, '[metrics]\naddress = "::1"\nport = 0\ndomains = ["a"]\n')) == \
        MetricsConfig(enabled=True, address="::1", port=0, domains=("a",))
    assert load_metrics(config(tmp_path, "[metrics]\nenabled = false\n")) == MetricsConfig(enabled=False)


def test_a_remote_address_needs_allow_remote(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="allow_remote"):
        load_metrics(config(tmp_path, '[metrics]\naddress = "0.0.0.0"\n'))
    with pytest.raises(UsageError, match="allow_remote"):
        load_metrics(config(tmp_path, '[metrics]\naddress = "198.18.0.1"\n'))
    loaded = load_metrics(config(tmp_path, '[metrics]\naddress = "0.0.0.0"\nallow_remote = true\n'))
    assert loaded is not None and loaded.address == "0.0.0.0" and loaded.allow_remote


@pytest.mark.parametrize("toml,message", [
    ("port = 65536", r"\[metrics\] port: "), ("port = -1", r"\[metrics\] port: "), ('port = "9177"', r"\[metrics\] port: "),
    ("port = true", r"\[metrics\] port: "), ("port = 9177.0", r"\[metrics\] port: "),
    ('address = "localhost"', "IP address"), ('address = "127.0.0.1:9177"', "IP address"), ("address = 1", "IP address"),
    ('enabled = "yes"', r"\[metrics\] enabled: "), ("allow_remote = 1", r"\[metrics\] allow_remote: "),
    ('domains = "web1"', r"\[metrics\] domains: "), ("domains = [1]", r"\[metrics\] domains: "),
    ("listen = 1", r"\[metrics\] unknown key listen; allowed: "),
])
def test_bad_metrics_values_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_metrics(config(tmp_path, f"[metrics]\n{toml}\n"))


def test_hvextd_refuses_a_remote_metrics_address(tmp_path: Path) -> None:
    path = config(tmp_path, '[metrics]\naddress = "0.0.0.0"\n')
    proc = subprocess.run([sys.executable, "-m", "hvext.daemon.main", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "allow_remote" in proc.stderr


# -- pure parts ---------------------------------------------------------------------------------


def exposition(snapshot: metrics.Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render *snapshot* as Prometheus text and parse it back: {(sample name, labels): value}."""
    registry = CollectorRegistry()

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return metrics.families(snapshot)
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_families_export_what_is_known_under_the_declared_names() -> None:
    snapshot = metrics.Snapshot(
        meminfo={"MemTotal": 8 << 30, "MemAvailable": 5 << 30, "SwapTotal": 4 << 30, "SwapFree": 3 << 30},
        connected=True,
        domains=[metrics.DomainSample("web", 512 * MIB, 1024 * MIB, balloon.Target(448 * MIB, "hvext"),
                                      qemu_rss=300 * MIB, qemu_swap=MIB, classes={"free": 100 * MIB},
                                      dirty_rate=("page-sampling", 3 * MIB)),
                 metrics.DomainSample("plain", 256 * MIB, 256 * MIB),
                 metrics.DomainSample("ramvm", 256 * MIB, 256 * MIB, qemu_rss=40 * MIB, ram_file=200 * MIB)],
        entitlements={"/": 768 * MIB, "/prod": 512 * MIB},
        pmem=[metrics.PmemDevice("web", "/dev/shm/hvext/web/p0.img", 7, 1.7e9, 65536, 0.25),
              metrics.PmemDevice("db", "/dev/shm/hvext/db/p0.img", None, None, None, None)],
        duration_s=0.5)
    samples = exposition(snapshot)
    names = {name for name, _ in samples}
    assert names <= metrics.exported_names()
    web = (("domain", "web"),)
    assert samples[("hvext_domain_balloon_actual_bytes", web)] == 512 * MIB
    assert samples[("hvext_domain_balloon_target_bytes", (("domain", "web"), ("source", "hvext")))] == 448 * MIB
    assert samples[("hvext_domain_memory_class_bytes", (("class", "free"), ("domain", "web")))] == 100 * MIB
    assert samples[("hvext_domain_dirty_rate_bytes_per_second", (("domain", "web"), ("mode", "page-sampling")))] \
        == 3 * MIB
    assert samples[("hvext_host_swap_used_bytes", ())] == 1 << 30
    assert samples[("hvext_pool_entitlement_bytes", (("pool", "/prod"),))] == 512 * MIB
    assert samples[("hvext_pmem_store_generation",
                    (("backing", "/dev/shm/hvext/web/p0.img"), ("domain", "web")))] == 7
    # a RAM-file domain: QEMU's own memory and its RAM file, which together count it once
    assert samples[("hvext_domain_ram_file_bytes", (("domain", "ramvm"),))] == 200 * MIB
    assert samples[("hvext_domain_qemu_rss_bytes", (("domain", "ramvm"),))] == 40 * MIB
    # unknown values are left out, never exported as 0
    assert ("hvext_domain_qemu_rss_bytes", (("domain", "plain"),)) not in samples
    assert ("hvext_domain_ram_file_bytes", (("domain", "web"),)) not in samples
    assert not any(name == "hvext_domain_balloon_target_bytes" and ("domain", "plain") in labels
                   for name, labels in samples)
    assert not any(name.startswith("hvext_pmem") and ("domain", "db") in labels for name, labels in samples)


def test_a_disconnected_scrape_still_has_the_host() -> None:
    samples = exposition(metrics.Snapshot(meminfo={"MemTotal": 1 << 30, "MemAvailable": 1 << 29}, connected=False))
    assert samples[("hvext_libvirt_connected", ())] == 0
    assert samples[("hvext_host_memory_available_bytes", ())] == 1 << 29


@pytest.mark.parametrize("reply,expected", [
    ({"status": "unstarted"}, None),
    ({"status": "measuring", "mode": "page-sampling"}, None),
    ({"status": "measured", "dirty-rate": 12, "mode": "dirty-bitmap", "calc-time": 1}, ("dirty-bitmap", 12 * MIB)),
    ("nonsense", None),
])
def test_only_a_finished_dirty_rate_measurement_is_exported(reply: object, expected: object) -> None:
    assert metrics.measured_dirty_rate(reply) == expected


@pytest.mark.parametrize("reply", [
    {"status": "measured", "dirty-rate": -1, "mode": "page-sampling"},
    {"status": "measured", "dirty-rate": True, "mode": "page-sampling"},
    {"status": "measured", "dirty-rate": 5, "mode": "guess"},
])
def test_a_bad_dirty_rate_from_qemu_is_refused(reply: object) -> None:
    with pytest.raises(QMPError):
        metrics.measured_dirty_rate(reply)


def memclass_reply(**classes_pages: int) -> dict[str, object]:
    pages = {name: 0 for name in classes.CLASSES} | classes_pages
    return {"version": classes.SCHEMA_VERSION, "page_size": 4096, "total": sum(pages.values()), "classes": pages}


def test_class_bytes_of_a_plausible_report_and_none_of_an_implausible_one() -> None:
    report = classes.validate(memclass_reply(free=1000, anon_active=3000), domain="d", host_limit=1 << 30)
    assert metrics.class_bytes(report)["free"] == 1000 * 4096
    assert metrics.class_bytes(report)["anon_active"] == 3000 * 4096
    liar = classes.validate(memclass_reply(free=1000), domain="d", host_limit=MIB)  # more than its RAM
    assert not liar.plausible and metrics.class_bytes(liar) == {}


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_migration_lifecycle_events_are_counted_and_others_ignored() -> None:
    before_out, before_in = counter("hvext_migrations_total", domain="m1", direction="out"), \
        counter("hvext_migrations_total", domain="m1", direction="in")
    metrics.count_lifecycle("m1", "stopped", libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)
    metrics.count_lifecycle("m1", "started", libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED)
    metrics.count_lifecycle("m1", "stopped", libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
    assert counter("hvext_migrations_total", domain="m1", direction="out") == before_out + 1
    assert counter("hvext_migrations_total", domain="m1", direction="in") == before_in + 1


def test_power_loss_reports_are_counted() -> None:
    before = counter("hvext_pmem_saved_bytes_total", domain="p1")
    metrics.count_power_loss({"devices": [
        {"domain": "p1", "backing": "/a", "bytes_written": 4096, "seconds": 0.5},
        {"domain": "p1", "backing": "/b", "error": "store unreadable"}]})
    assert counter("hvext_pmem_saved_bytes_total", domain="p1") == before + 4096
    assert counter("hvext_pmem_saves_total", domain="p1", result="error") >= 1
    assert counter("hvext_pmem_save_seconds_total", domain="p1") >= 0.5


# -- reading: pmem and pools --------------------------------------------------------------------


def test_one_unreadable_pmem_store_leaves_the_others_exported(tmp_path: Path) -> None:
    good_store, bad_store = tmp_path / "stores" / "good", tmp_path / "stores" / "bad"
    Store.create(good_store, 1 << 20)
    bad_store.mkdir(parents=True)
    (bad_store / "manifest.json").write_text('{"format": "nonsense"}')
    registry_dir = tmp_path / "power"
    with power.registry(registry_dir) as regs:
        for name, store in (("good", good_store), ("bad", bad_store)):
            regs.append(power.Registration(name, f"uuid-{name}", f"/dev/shm/hvext/{name}/p.img", str(store),
                                           "nvdimm", 1 << 20, "memnvdimm0",
                                           last_save={"generation": 0, "bytes_written": 1 << 20, "seconds": 0.1}))
    devices, errors = metrics.read_pmem(registry_dir)
    assert errors == [("bad", "pmem")]
    by_domain = {d.domain: d for d in devices}
    assert by_domain["good"].generation == 0 and by_domain["good"].last_save_bytes == 1 << 20
    assert by_domain["bad"].generation is None and by_domain["bad"].last_save_seconds == 0.1


def test_entitlements_are_read_without_creating_a_pool_store(tmp_path: Path) -> None:
    path = tmp_path / "pools.sqlite"
    assert metrics.read_entitlements({"vm-a": 512 * MIB}, PoolStore(path)) == {}
    assert not path.exists()
    tree = PoolStore(path).load(capacity_mib=1024)
    tree.create("/dev", reservation_mib=128)
    tree.create("/dev/a", domain="vm-a")
    entitled = metrics.read_entitlements({"vm-a": 512 * MIB}, PoolStore(path))
    assert entitled["/dev/a"] == 512 * MIB and entitled["/dev"] == 512 * MIB


# -- one domain's failure is isolated (real libvirt: the test driver) ---------------------------

PLAIN = PLAIN_XML
#: A domain hvext claims to manage whose QMP monitor is not there: reading it fails for real.
BROKEN = ("<domain type='test'><name>{name}</name><memory unit='MiB'>256</memory><os><type>hvm</type></os>"
          f"<metadata><hvext:domain xmlns:hvext='{HVEXT_NS}'><hvext:qmp path='/nonexistent/hvext-qmp.sock'/>"
          "<hvext:qmp-cli path='/nonexistent/hvext-qmp-cli.sock'/></hvext:domain></metadata></domain>")


def test_a_domain_that_cannot_be_read_is_skipped_and_counted_and_the_others_exported() -> None:
    with running_domain(PLAIN, "metrics-ok") as good, running_domain(BROKEN, "metrics-broken") as broken:
        collector = metrics.HvextCollector(lambda: good.host, (good.name, broken.name))
        errors_before = counter("hvext_scrape_errors_total", domain=broken.name, source="qmp")
        registry = CollectorRegistry()
        registry.register(collector)
        text = generate_latest(registry).decode()
        samples = {(s.name, s.labels.get("domain")): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("hvext_domain_balloon_actual_bytes", good.name)] == good.dom.info()[2] * KIB  # no balloon stats
        assert samples[("hvext_domain_memory_max_bytes", good.name)] == 256 * MIB
        assert samples[("hvext_libvirt_connected", None)] == 1
        assert not any(domain == broken.name for _, domain in samples)
        assert counter("hvext_scrape_errors_total", domain=broken.name, source="qmp") == errors_before + 1


# -- the Grafana dashboard ----------------------------------------------------------------------


def dashboard_queries(node: object) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "(" in value:
                found.append(value)
            else:
                found += dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_queries(item)
    return found


def test_the_dashboard_uses_only_metrics_the_exporter_defines() -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20
    used = {name for query in queries for name in re.findall(r"\bhvext_[a-z0-9_]+", query)}
    assert used, "the dashboard queries no hvext metric"
    assert used <= metrics.exported_names(), f"not exported by hvextd: {sorted(used - metrics.exported_names())}"
    for query in queries:
        assert re.search(r"\bhvext_[a-z0-9_]+", query), f"expression without an hvext metric: {query}"
    # every family the exporter defines is on the dashboard
    families = {spec.name for spec in (*metrics.GAUGES.values(), *metrics.COUNTERS.values())}
    shown = {name.removesuffix("_total") for name in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"
