"""``python -m kombu_pg.cli``: the ``kombu-pg`` command."""
import sys

from . import main

sys.exit(main())
