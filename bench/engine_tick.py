"""Time the worker's engine tick per slot count: the same as `callcenter bench` (see bench/README.md).

    python bench/engine_tick.py --slots 1,8,16,32,64            tiny model, CPU
    python bench/engine_tick.py --full --slots 1,8,16,24,32     full size, random weights, GPU

Set LOG_LEVEL=warning for JSON lines only on stdout and no progress on stderr.
"""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
