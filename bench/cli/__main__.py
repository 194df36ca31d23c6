"""``python -m bench.cli ...`` is ``bench ...``."""

from bench.cli import main

main()
