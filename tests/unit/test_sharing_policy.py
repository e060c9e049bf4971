import pytest

from hvext.errors import UsageError
from hvext.memory.sharing_policy import (PAGE_SIZE, REGION_PAGES, ZERO_HASH, KSMSettings, Region, analyse,
                                         group_saving, page_hash)


def test_page_hash_tells_contents_apart_and_knows_zero() -> None:
    assert page_hash(bytes(PAGE_SIZE)) == ZERO_HASH
    assert page_hash(b"\x01" + bytes(PAGE_SIZE - 1)) != ZERO_HASH


def test_group_saving_follows_max_page_sharing() -> None:
    assert group_saving(1, 256) == 0
    assert group_saving(2, 256) == 1
    assert group_saving(256, 256) == 255
    assert group_saving(257, 256) == 255  # a second KSM page (a chain dup) for the 257th sharer
    assert group_saving(1000, 256) == 1000 - 4


def test_counts_within_other_vms_and_zero() -> None:
    a = Region("a", 0, (1, 1, 1, 2, 3, ZERO_HASH, ZERO_HASH), large=False)
    b = Region("b", 0, (2, 4, ZERO_HASH), large=False)
    est = analyse([a, b])
    va, vb = est.vms
    assert (va.vm, va.resident_pages, va.zero_pages, va.shareable_within, va.shareable_with_others) == \
        ("a", 7, 2, 2, 1)
    assert (vb.resident_pages, vb.zero_pages, vb.shareable_within, vb.shareable_with_others) == (3, 1, 0, 1)
    # groups: 1 x3 -> 2, 2 x2 -> 1, zero x3 -> 2 (merged into one KSM page: use_zero_pages is off)
    assert est.saved_pages_with_breaking == est.saved_pages_without_breaking == 5
    assert est.to_dict()["estimated_savings_bytes"] == 5 * PAGE_SIZE
    zero = analyse([a, b], settings=KSMSettings(use_zero_pages=True))
    assert zero.saved_pages_with_breaking == 2 + 1 + 3  # every zero page becomes the kernel's zero page


def test_large_pages_only_broken_when_the_gain_beats_the_tlb_value() -> None:
    dup_rich = Region("a", 0, tuple([7] * 100) + tuple(range(1000, 1000 + REGION_PAGES - 100)), large=True)
    dup_poor = Region("a", 1, tuple([8] * 10) + tuple(range(5000, 5000 + REGION_PAGES - 10)), large=True)
    small = Region("b", 0, (7, 8), large=False)
    est = analyse([dup_rich, dup_poor, small], tlb_value_pages=64)
    assert [(c.vm, c.index, c.gain_pages) for c in est.to_break] == [("a", 0, 100)]
    assert est.kept_large == 1
    assert est.saved_pages_without_breaking == 0  # 7 and 8 each once outside large pages
    assert est.saved_pages_with_breaking == 100 + 10  # 101 sevens -> 100, 11 eights -> 10
    assert est.saved_pages_policy == 100  # the eights stay in their large page
    everything = analyse([dup_rich, dup_poor, small], tlb_value_pages=5)
    assert len(everything.to_break) == 2 and everything.saved_pages_policy == 110


def test_bad_inputs_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Region("a", 0, tuple(range(REGION_PAGES + 1)), large=False)
    with pytest.raises(UsageError):
        analyse([], tlb_value_pages=-1)
    with pytest.raises(UsageError):
        KSMSettings(max_page_sharing=1)


def test_splitting_a_large_page_frees_its_zero_pages() -> None:
    zeros = 300
    large = Region("a", 0, (ZERO_HASH,) * zeros + (9,) + tuple(range(100, 100 + REGION_PAGES - zeros - 1)),
                   large=True)
    small = Region("b", 0, (9, ZERO_HASH), large=False)
    est = analyse([large, small], tlb_value_pages=64)
    # KSM splits the large page to merge the 9s; the split maps its 300 zero pages to the zero page;
    # the small region's one zero page has nobody left to merge with
    assert est.saved_pages_with_breaking == zeros + 1
    assert est.saved_pages_without_breaking == 0
    assert [c.gain_pages for c in est.to_break] == [zeros + 1] and est.saved_pages_policy == zeros + 1
    old = analyse([large, small], settings=KSMSettings(split_frees_zero_pages=False))
    assert old.saved_pages_with_breaking == 1 + group_saving(zeros + 1, 256)  # zero pages merge into two KSM pages
