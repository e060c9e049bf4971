import base64

import pytest

from hvext.dirty.pages import decode
from hvext.errors import QMPError


def reply(blocks: list[dict]) -> dict:
    return {"page-size": 4096, "generation": 2, "interval-ms": 1000, "dirty": sum(b["dirty"] for b in blocks),
            "blocks": blocks}


def test_runs_and_bitmap_decode_to_the_same_pages() -> None:
    runs = {"id": "ram", "length": 64 * 4096, "migratable": True, "pages": 64, "dirty": 6, "runs": [0, 1, 10, 3, 62, 2]}
    bits = bytearray(8)
    for page in (0, 10, 11, 12, 62, 63):
        bits[page // 8] |= 1 << (page % 8)
    bitmap = dict(runs, bitmap=base64.b64encode(bytes(bits)).decode())
    del bitmap["runs"]
    a, b = decode(reply([runs])), decode(reply([bitmap]))
    assert list(a.blocks["ram"].page_numbers()) == list(b.blocks["ram"].page_numbers()) == [0, 10, 11, 12, 62, 63]
    assert a.dirty == 6 and a.blocks["ram"].contains(11) and not a.blocks["ram"].contains(13)


def test_histogram_per_bucket() -> None:
    pages = decode(reply([{"id": "ram", "length": 8 * 4096, "migratable": True, "pages": 8, "dirty": 5,
                           "runs": [1, 4, 7, 1]}]))
    assert pages.histogram("ram", bucket=4 * 4096) == [3, 2]


@pytest.mark.parametrize("block,message", [
    ({"runs": [0, 1, 2]}, "odd run list"),
    ({"runs": [5, 2, 4, 1]}, "bad run"),
    ({"runs": [60, 10]}, "bad run"),
    ({"runs": [0, 2], "dirty": 3}, "QEMU says 3"),
    ({"bitmap": base64.b64encode(b"\x00").decode()}, "bitmap of ram"),
])
def test_malformed_replies_are_refused(block: dict, message: str) -> None:
    base = {"id": "ram", "length": 64 * 4096, "migratable": True, "pages": 64, "dirty": 2}
    with pytest.raises(QMPError, match=message):
        decode(reply([dict(base, **block)]))
