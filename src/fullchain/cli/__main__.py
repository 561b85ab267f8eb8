"""`python -m fullchain.cli`: the `ds` command."""

from fullchain.cli import main

main()
