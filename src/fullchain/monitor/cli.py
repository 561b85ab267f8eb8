"""`ds-monitor`: the name is reserved here; the live monitor arrives with the monitoring work (C13)."""

import sys


def main() -> None:
    print("ds-monitor is not available in this version of fullchain yet (planned: capability C13)", file=sys.stderr)
    sys.exit(2)
