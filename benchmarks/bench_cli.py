"""`prefixlab --help` wall time (target <= 2 s: the CLI imports torch lazily)."""

import json
import subprocess
import sys
import time
from pathlib import Path

from common import machine, stats

ROOT = Path(__file__).resolve().parents[1]


def main():
    exe = Path(sys.executable).parent / "prefixlab"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, str(ROOT / "cli.py"), "--help"]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"machine": machine(), "help_s": {**stats(times), "target_s": 2}}, indent=2))


if __name__ == "__main__":
    main()
