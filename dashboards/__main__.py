"""python -m dashboards [--check]: write (or verify) charts/moe-operator/dashboards/*.json."""

from __future__ import annotations

import argparse
import sys

from . import OUT_DIR, REPO, stale, write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not a fresh build")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"stale: {(OUT_DIR / name).relative_to(REPO)} (run `python -m dashboards`)", file=sys.stderr)
        return 1 if bad else 0
    for path in write():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
