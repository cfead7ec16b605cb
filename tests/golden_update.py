"""Regenerate the bit-identity goldens (see tests/test_golden_runs.py for when).

    PYTHONPATH=$PWD python -m tests.golden_update [case ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.test_golden_runs import CASES, update


def main(argv: list[str]) -> int:
    cases = argv or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        update(cases, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
