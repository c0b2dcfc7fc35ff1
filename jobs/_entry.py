"""Shared bootstrap of the Ray job entry points.

`ray job submit --working-dir . -- python jobs/<stage>.py --config FILE` runs these on the cluster
from the uploaded working directory, where `nic` may not be installed: put platform/ on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

PLATFORM = Path(__file__).resolve().parent.parent / "platform"


def run_stage(stage: str) -> None:
    if str(PLATFORM) not in sys.path:
        sys.path.insert(0, str(PLATFORM))
    from nic.cli.main import main

    sys.exit(main([stage, *sys.argv[1:]]))
