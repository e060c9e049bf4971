"""Child of test_replication_log's crash test: receive epochs one by one, slowly, until killed."""

import sys
import time
from pathlib import Path

from hvext.ha.replication_log import DeviceSpec, ReplicaImage

BS = 4096
DEVICES = [DeviceSpec("pmem0", 16 * BS), DeviceSpec("pmem1", 8 * BS)]


def main() -> None:
    replica, source, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    with ReplicaImage.open(replica) as image:
        for i in range(count):
            image.receive("s", (source / f"e{i}").read_bytes(), DEVICES, hook=lambda *_: time.sleep(0.004))


if __name__ == "__main__":
    main()
