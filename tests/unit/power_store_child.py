"""Child for the store crash tests: ``python power_store_child.py STORE SOURCE block|switch``.

Saves SOURCE into STORE and stops (prints a line and sleeps) at the chosen point so the
parent can SIGKILL it there: after the first written block, or right before the manifest switch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hvext.pmem.store import Store


def main() -> None:
    store_dir, source, point = sys.argv[1], sys.argv[2], sys.argv[3]

    def hook(where: str, n: int) -> None:
        if where == point:
            print(f"{where} {n}", flush=True)
            time.sleep(3600)

    Store.open(Path(store_dir)).save(Path(source), hook=hook)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
