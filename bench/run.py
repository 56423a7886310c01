"""One command for the whole benchmark (`make bench`):

    python bench/run.py [--quick] [--runs N] [--duration S] [--scenarios plain demo ...]

Installs nginx and wrk when missing (bench/deps.sh), starts an NGINX origin and NGINX as
a proxy, and strangler per scenario, measures each under the same CPU pinning and writes
bench/RESULTS.md. See bench/main.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
