"""Resource tree API: the contract, every consistency rule, every error, atomicity, VM leaves."""

from __future__ import annotations

from typing import Any

import pytest

from hvext.errors import HvextError, UsageError
from hvext.memory.pools import (
    RULE_CHILDREN,
    RULE_LIMIT,
    RULE_PARENT_LIMIT,
    AssignmentError,
    ConsistencyError,
    InvalidPathError,
    InvalidValueError,
    PoolExistsError,
    PoolLockError,
    PoolNode,
    PoolNotEmptyError,
    PoolNotFoundError,
    ResourceTree,
    normalize_path,
)


@pytest.fixture
def tree() -> ResourceTree:
    """/prod (non-expandable, 2048 reserved, limit 6144) holding /prod/web; /dev expandable."""
    t = ResourceTree(capacity_mib=8192)
    t.create("/prod", reservation_mib=2048, limit_mib=6144, shares=2000, expandable=False)
    t.create("/prod/web", reservation_mib=512, limit_mib=None, shares=1000)
    t.create("/dev", reservation_mib=0, expandable=True)
    return t


def test_contract_example() -> None:
    tree = ResourceTree(capacity_mib=8192)
    tree.create("/prod", reservation_mib=2048, limit_mib=6144, shares=2000, expandable=False)
    tree.create("/prod/web", reservation_mib=512, limit_mib=None, shares=1000)
    tree.modify("/prod", reservation_mib=1024)
    node = tree.get("/prod")
    assert (node.path, node.reservation_mib, node.limit_mib, node.shares, node.expandable) == (
        "/prod", 1024, 6144, 2000, False,
    )
    assert node.children == ("/prod/web",)
    assert tree.entitlements({"/prod/web": 3000}) == {"/prod/web": 3000}
    tree.remove("/prod/web")
    assert tree.get("/prod").children == ()
    tree.validate()


def test_node_view(tree: ResourceTree) -> None:
    root = tree.get("/")
    assert root.is_root and not root.is_leaf and root.parent is None and root.name == "/"
    assert (root.reservation_mib, root.limit_mib, root.effective_reservation_mib) == (8192, 8192, 8192)
    assert root.children == ("/dev", "/prod")
    web = tree.get("/prod/web")
    assert web.is_leaf and web.name == "web" and web.parent == "/prod" and web.depth == 2
    assert web.effective_reservation_mib == 512 and web.domain is None
    assert tree.capacity_mib == 8192
    assert isinstance(tree.get("/dev/"), PoolNode)  # one trailing slash is tolerated


def test_effective_reservation_of_expandable_pools(tree: ResourceTree) -> None:
    tree.create("/dev/a", reservation_mib=300)
    tree.create("/dev/b", reservation_mib=200, expandable=True)
    tree.create("/dev/b/c", reservation_mib=700)
    assert tree.get("/dev/b").effective_reservation_mib == 700  # max(200, 700)
    assert tree.get("/dev").effective_reservation_mib == 1000  # max(0, 300 + 700)
    tree.modify("/dev", reservation_mib=1500)
    assert tree.get("/dev").effective_reservation_mib == 1500
    tree.modify("/dev/b/c", reservation_mib=100)
    assert tree.get("/dev/b").effective_reservation_mib == 200
    tree.validate()


# ------------------------------------------------------------------ rules


def _raises_rule(rule: str, *nodes: str) -> Any:
    """pytest.raises for a ConsistencyError of *rule* naming *nodes* in that order."""
    return pytest.raises(ConsistencyError, match=rf"rule {rule}; nodes .*{'.*'.join(nodes)}")


def test_rule_reservation_within_limit(tree: ResourceTree) -> None:
    with _raises_rule(RULE_LIMIT, "/x"):
        tree.create("/x", reservation_mib=600, limit_mib=500)
    with _raises_rule(RULE_LIMIT, "/prod"):
        tree.modify("/prod", limit_mib=1000)  # reservation 2048 > 1000
    with _raises_rule(RULE_LIMIT, "/prod/web"):
        tree.modify("/prod/web", limit_mib=100)
    tree.modify("/prod/web", limit_mib=512)  # equal is fine
    tree.validate()


def test_rule_expandable_effective_reservation_within_limit(tree: ResourceTree) -> None:
    tree.modify("/dev", limit_mib=1000)
    tree.create("/dev/a", reservation_mib=800)
    with _raises_rule(RULE_LIMIT, "/dev", "/dev/b"):
        tree.create("/dev/b", reservation_mib=300)  # /dev would need 1100 > 1000
    with _raises_rule(RULE_LIMIT, "/dev"):
        tree.modify("/dev", limit_mib=700)
    # Through two expandable levels: /dev would need 800 + 250.
    tree.create("/dev/e", expandable=True)
    tree.create("/dev/e/f", reservation_mib=100)
    with _raises_rule(RULE_LIMIT, "/dev", "/dev/e", "/dev/e/f"):
        tree.modify("/dev/e/f", reservation_mib=250)
    assert tree.get("/dev").effective_reservation_mib == 900
    tree.validate()


def test_rule_expandable_chain_limit_at_intermediate(tree: ResourceTree) -> None:
    tree.create("/dev/e", expandable=True, limit_mib=150)
    tree.create("/dev/e/f", reservation_mib=100)
    with _raises_rule(RULE_PARENT_LIMIT, "/dev/e", "/dev/e/g"):
        tree.create("/dev/e/g", reservation_mib=200)
    with _raises_rule(RULE_LIMIT, "/dev/e", "/dev/e/g"):
        tree.create("/dev/e/g", reservation_mib=60)  # /dev/e would reach 160 > 150
    tree.create("/dev/e/g", reservation_mib=50)
    assert tree.get("/dev/e").effective_reservation_mib == 150
    tree.validate()


def test_rule_reservation_within_parent_limit(tree: ResourceTree) -> None:
    tree.create("/cap", reservation_mib=0, limit_mib=500, expandable=True)
    with _raises_rule(RULE_PARENT_LIMIT, "/cap", "/cap/a"):
        tree.create("/cap/a", reservation_mib=600)
    tree.create("/cap/a", reservation_mib=400)
    with _raises_rule(RULE_PARENT_LIMIT, "/cap", "/cap/a"):
        tree.modify("/cap/a", reservation_mib=501)
    # Lowering a parent's limit below a child's reservation (with a reservation
    # the other rules accept) is caught on the children.
    tree.create("/np", reservation_mib=500, limit_mib=None)
    tree.create("/np/c", reservation_mib=400)
    with _raises_rule(RULE_PARENT_LIMIT, "/np", "/np/c"):
        tree.modify("/np", reservation_mib=300, limit_mib=350)
    # The root's limit is the capacity.
    with _raises_rule(RULE_PARENT_LIMIT, "/", "/huge"):
        tree.create("/huge", reservation_mib=9000, expandable=True)
    tree.validate()


def test_rule_children_within_reservation(tree: ResourceTree) -> None:
    with _raises_rule(RULE_CHILDREN, "/prod", "/prod/db"):
        tree.create("/prod/db", reservation_mib=1600)  # 512 + 1600 > 2048
    tree.create("/prod/db", reservation_mib=1536)  # exactly full
    with _raises_rule(RULE_CHILDREN, "/prod", "/prod/web"):
        tree.modify("/prod/web", reservation_mib=513)
    with _raises_rule(RULE_CHILDREN, "/prod"):
        tree.modify("/prod", reservation_mib=2047)
    tree.validate()


def test_rule_children_within_reservation_at_root(tree: ResourceTree) -> None:
    tree.create("/big", reservation_mib=6144)  # 2048 + 6144 = 8192: full
    with _raises_rule(RULE_CHILDREN, "/", "/more"):
        tree.create("/more", reservation_mib=1)
    # Expandable pools borrow from the root.
    tree.create("/dev/x", reservation_mib=0)
    with _raises_rule(RULE_CHILDREN, "/", "/dev", "/dev/x"):
        tree.modify("/dev/x", reservation_mib=1)
    with _raises_rule(RULE_CHILDREN, "/"):
        tree.set_capacity(8191)
    assert tree.set_capacity(8192).reservation_mib == 8192
    tree.remove("/big")
    assert tree.set_capacity(4096).limit_mib == 4096
    assert tree.capacity_mib == 4096
    tree.validate()


def test_rule_through_expandable_chain_names_every_node(tree: ResourceTree) -> None:
    tree.create("/a", reservation_mib=1000)
    tree.create("/a/e", expandable=True)
    tree.create("/a/e/x", reservation_mib=600)
    with pytest.raises(ConsistencyError) as info:
        tree.create("/a/e/y", reservation_mib=500)
    assert info.value.rule == RULE_CHILDREN
    assert info.value.nodes == ("/a", "/a/e", "/a/e/y")
    assert "1100 MiB" in str(info.value) and "1000 MiB" in str(info.value)


def test_toggle_expandable(tree: ResourceTree) -> None:
    tree.create("/dev/a", reservation_mib=700)
    with _raises_rule(RULE_CHILDREN, "/dev", "/dev/a"):
        tree.modify("/dev", expandable=False)  # reservation 0 cannot hold 700
    tree.modify("/dev", expandable=False, reservation_mib=700)
    assert tree.get("/dev").effective_reservation_mib == 700
    tree.modify("/dev", expandable=True, reservation_mib=0)
    assert tree.get("/dev").effective_reservation_mib == 700
    tree.validate()


def test_shares_and_limit_changes_keep_effective_reservation(tree: ResourceTree) -> None:
    tree.modify("/prod/web", shares=7, limit_mib=4000)
    web = tree.get("/prod/web")
    assert (web.shares, web.limit_mib, web.effective_reservation_mib) == (7, 4000, 512)
    tree.modify("/prod/web", limit_mib=None)
    assert tree.get("/prod/web").limit_mib is None


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reservation_mib": -1},
        {"reservation_mib": 1.5},
        {"reservation_mib": "512"},
        {"reservation_mib": True},
        {"reservation_mib": None},
        {"reservation_mib": 1 << 60},
        {"limit_mib": -5},
        {"limit_mib": 2.0},
        {"shares": 0},
        {"shares": -3},
        {"shares": 1.0},
        {"shares": False},
        {"expandable": 1},
        {"expandable": "yes"},
    ],
)
def test_bad_values(tree: ResourceTree, kwargs: dict[str, object]) -> None:
    before = tree.snapshot()
    with pytest.raises(InvalidValueError) as info:
        tree.create("/new", **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, UsageError) and isinstance(info.value, HvextError)
    with pytest.raises(InvalidValueError):
        tree.modify("/prod/web", **kwargs)  # type: ignore[arg-type]
    assert tree.snapshot() == before


@pytest.mark.parametrize("path", ["prod", "", "/a//b", "/a b", "/../x", "/.hidden", "/x" + "y" * 64, 5, None, "//"])
def test_bad_paths(tree: ResourceTree, path: object) -> None:
    with pytest.raises(InvalidPathError) as info:
        tree.get(path)  # type: ignore[arg-type]
    assert isinstance(info.value, UsageError)
    with pytest.raises(InvalidPathError):
        tree.create(path)  # type: ignore[arg-type]


def test_normalize_path() -> None:
    assert normalize_path("/") == "/"
    assert normalize_path("/a/b/") == "/a/b"
    assert normalize_path("/vm-1.x_y:z@h+1") == "/vm-1.x_y:z@h+1"


def test_unknown_paths(tree: ResourceTree) -> None:
    for call in (
        lambda: tree.get("/nope"),
        lambda: tree.get("/prod/web/deeper"),
        lambda: tree.modify("/nope", shares=5),
        lambda: tree.remove("/prod/nope"),
        lambda: tree.create("/nope/child"),
        lambda: tree.assign("vm", "/nope"),
        lambda: tree.walk("/nope"),
    ):
        with pytest.raises(PoolNotFoundError) as info:
            call()
        assert isinstance(info.value, UsageError) and isinstance(info.value, LookupError)
    assert tree.exists("/prod/web") and not tree.exists("/prod/nope")


def test_duplicate_and_root_operations(tree: ResourceTree) -> None:
    with pytest.raises(PoolExistsError, match="already exists"):
        tree.create("/prod/web")
    with pytest.raises(PoolExistsError):
        tree.create("/")
    with pytest.raises(InvalidValueError, match="set_capacity"):
        tree.modify("/", reservation_mib=1)
    with pytest.raises(InvalidValueError, match="cannot be removed"):
        tree.remove("/")
    with pytest.raises(InvalidValueError, match="at least one"):
        tree.modify("/prod")
    with pytest.raises(InvalidValueError):
        tree.set_capacity(-1)
    with pytest.raises(InvalidValueError):
        ResourceTree(capacity_mib=-1)
    with pytest.raises(TypeError):
        tree.modify("/prod", colour="red")  # type: ignore[call-arg]


def test_remove(tree: ResourceTree) -> None:
    tree.create("/prod/db", reservation_mib=1536)
    with pytest.raises(ConsistencyError):
        tree.create("/prod/cache", reservation_mib=1)
    with pytest.raises(PoolNotEmptyError, match="recursive"):
        tree.remove("/prod")
    tree.remove("/prod/db")
    tree.create("/prod/cache", reservation_mib=1536)  # the freed reservation is reusable
    tree.create("/dev/a", expandable=True)
    tree.create("/dev/a/b", reservation_mib=3000)
    assert tree.get("/dev").effective_reservation_mib == 3000
    tree.remove("/dev/a", recursive=True)
    assert tree.get("/dev").effective_reservation_mib == 0
    assert not tree.exists("/dev/a/b")
    tree.create("/dev/a")  # the name is free again
    tree.validate()


# ------------------------------------------------------------------ atomicity


def test_failed_modifications_leave_no_trace(tree: ResourceTree) -> None:
    tree.create("/dev/x", reservation_mib=100)
    before = tree.snapshot()
    failures = [
        lambda: tree.modify("/prod", reservation_mib=100, shares=5, limit_mib=7000),
        lambda: tree.modify("/dev/x", reservation_mib=99999, shares=1),
        lambda: tree.modify("/prod/web", shares=3, reservation_mib=-1),
        lambda: tree.create("/prod/db", reservation_mib=4000),
        lambda: tree.create("/dev/x/y", reservation_mib=9000),
        lambda: tree.set_capacity(10),
        lambda: tree.remove("/prod"),
    ]
    for call in failures:
        with pytest.raises(HvextError):
            call()
        assert tree.snapshot() == before
    tree.validate()


def test_interrupted_modification_leaves_no_trace(tree: ResourceTree) -> None:
    """An exception after the locks are taken (the test hook) changes nothing and frees the locks."""
    before = tree.snapshot()

    def boom(operation: str, path: str) -> None:
        raise KeyboardInterrupt

    tree._after_lock = boom
    for call in (
        lambda: tree.modify("/prod", reservation_mib=3000),
        lambda: tree.create("/prod/x", reservation_mib=1),
        lambda: tree.remove("/prod/web"),
        lambda: tree.assign("vm1", "/prod/web"),
        lambda: tree.set_capacity(9000),
    ):
        with pytest.raises(KeyboardInterrupt):
            call()
    tree._after_lock = None
    assert tree.snapshot() == before
    tree.modify("/prod", reservation_mib=3000)  # nothing left locked
    tree.validate()


# ------------------------------------------------------------------ VM leaves


def test_assign_and_lookup(tree: ResourceTree) -> None:
    node = tree.assign("vm-web-1", "/prod/web")
    assert node.domain == "vm-web-1"
    assert tree.lookup("vm-web-1") == "/prod/web"
    assert tree.lookup("other") is None
    assert tree.assign("vm-web-1", "/prod/web").domain == "vm-web-1"  # idempotent
    assert tree.assignments() == {"vm-web-1": "/prod/web"}
    tree.create("/prod/db", reservation_mib=256, domain="vm-db")
    assert tree.get("/prod/db").domain == "vm-db" and tree.lookup("vm-db") == "/prod/db"
    assert tree.unassign("vm-web-1") == "/prod/web"
    assert tree.lookup("vm-web-1") is None and tree.get("/prod/web").domain is None
    tree.assign("vm-web-1", "/dev")  # a childless pool is a leaf
    assert tree.get("/dev").is_leaf


def test_assign_errors(tree: ResourceTree) -> None:
    tree.assign("vm1", "/prod/web")
    with pytest.raises(AssignmentError, match="root"):
        tree.assign("vm2", "/")
    with pytest.raises(AssignmentError, match="leaf"):
        tree.assign("vm2", "/prod")
    with pytest.raises(AssignmentError, match="already holds"):
        tree.assign("vm2", "/prod/web")
    with pytest.raises(AssignmentError, match="already assigned"):
        tree.assign("vm1", "/dev")
    with pytest.raises(AssignmentError, match="already assigned"):
        tree.create("/dev/vm", domain="vm1")
    assert not tree.exists("/dev/vm")
    with pytest.raises(AssignmentError, match="cannot have children"):
        tree.create("/prod/web/child")
    with pytest.raises(AssignmentError, match="unassign"):
        tree.remove("/prod/web")
    with pytest.raises(AssignmentError, match="unassign"):
        tree.remove("/prod", recursive=True)
    with pytest.raises(AssignmentError, match="not assigned"):
        tree.unassign("ghost")
    for bad in ("", "a/b", " x", "tab\there", 7):
        with pytest.raises(InvalidValueError):
            tree.assign(bad, "/dev")  # type: ignore[arg-type]
    assert isinstance(AssignmentError("x"), UsageError)
    tree.unassign("vm1")
    tree.remove("/prod", recursive=True)
    assert tree.assignments() == {}


# ------------------------------------------------------------------ views


def test_walk_snapshot_to_dict(tree: ResourceTree) -> None:
    tree.create("/dev/a", reservation_mib=100)
    tree.assign("vm-a", "/dev/a")
    assert [n.path for n in tree.walk()] == ["/", "/dev", "/dev/a", "/prod", "/prod/web"]
    assert [n.path for n in tree.walk("/prod")] == ["/prod", "/prod/web"]
    assert list(tree.snapshot()) == ["/", "/dev", "/dev/a", "/prod", "/prod/web"]
    assert tree.leaves() == ["/dev/a", "/prod/web"]
    data = tree.to_dict({"/dev/a": 50, "/prod/web": 10_000})
    assert data["path"] == "/" and data["entitlement_mib"] == 50 + 6144
    dev, prod = data["children"]
    assert dev["effective_reservation_mib"] == 100 and dev["children"][0]["domain"] == "vm-a"
    assert prod["children"][0]["entitlement_mib"] == 6144  # capped by /prod's limit
    assert "entitlement_mib" not in tree.to_dict()


def test_entitlement_demand_errors(tree: ResourceTree) -> None:
    with pytest.raises(PoolNotFoundError):
        tree.entitlements({"/ghost": 1})
    with pytest.raises(InvalidValueError, match="not a leaf"):
        tree.entitlements({"/prod": 1})
    with pytest.raises(InvalidValueError):
        tree.entitlements({"/prod/web": -1})
    with pytest.raises(InvalidValueError):
        tree.entitlements({"/prod/web": 1.5})  # type: ignore[dict-item]
    with pytest.raises(InvalidValueError, match="two demands"):
        tree.entitlements({"/prod/web": 1, "/prod/web/": 2})
    with pytest.raises(InvalidValueError):
        tree.entitlements([("/prod/web", 1)])  # type: ignore[arg-type]
    assert tree.entitlements({}) == {"/dev": 0, "/prod/web": 0}


def test_consistency_error_carries_rule_and_nodes() -> None:
    err = ConsistencyError(RULE_CHILDREN, ["/a", "/a/b", "/a"], "detail")
    assert err.rule == RULE_CHILDREN and err.nodes == ("/a", "/a/b")
    assert str(err) == "detail [rule children-within-reservation; nodes /a, /a/b]"
    assert isinstance(err, UsageError) and isinstance(err, HvextError)


def test_locked_subtree_refuses_reentrant_use(tree: ResourceTree) -> None:
    with tree.locked_subtree("/prod") as node:
        assert node.path == "/prod"
        with pytest.raises(PoolLockError):
            tree.get("/dev")
        with pytest.raises(PoolLockError):
            tree.modify("/dev", shares=3)
    tree.modify("/dev", shares=3)


def test_pools_package_modules_import_only_public_names_of_each_other() -> None:
    """The package's modules share public names only, and none re-exports through a module __getattr__."""
    import ast
    from pathlib import Path

    import hvext.memory.pools as package

    for src in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(src.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hvext.memory.pools"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{src.name} imports private {private} from {node.module}"
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), src.name
