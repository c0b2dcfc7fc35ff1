"""`make bench`: run every benchmark with its default (demo-sized) settings, one after another.

Each script prints its table and writes benchmarks/results/<area>.md; benchmarks/RESULTS.md
collects the recorded numbers with the machine they ran on. Benchmarks compare ratios measured
in one run, so run them on a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_reader.py", "bench_encoders.py", "bench_synth.py", "bench_compress.py", "bench_downstream.py",
         "bench_startup.py", "bench_peers.py"]  # bench_peers skips hs2p unless this Python imports it


def main() -> int:
    failed = []
    for name in ORDER:
        script = HERE / name
        if not script.exists():
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
