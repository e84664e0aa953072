"""How long the `ldm` command takes to answer `--help`, against a bare Python start and an `import torch`.

The command imports torch and the models only when a command runs, so its help should cost about what
Python's own start does, far less than loading torch.

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "ldm --help": [sys.executable, "-m", "ldm.cli", "--help"],
    "ldm sample --help": [sys.executable, "-m", "ldm.cli", "sample", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runs = {
        name: (lambda argv=argv: subprocess.run(argv, check=True, capture_output=True))
        for name, argv in COMMANDS.items()
    }
    medians = interleaved_medians(runs, repeats=args.repeats)
    baseline = medians["python -c pass (baseline)"]
    print(f"{'command':40} {'median s':>9} {'x baseline':>11}")
    for name, seconds in medians.items():
        print(f"{name:40} {seconds:9.3f} {seconds / baseline:11.1f}")


if __name__ == "__main__":
    main()
