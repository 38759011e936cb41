"""``python -m moe_operator.cli``: the ``moe`` command."""

import sys

from moe_operator.cli.main import main

sys.exit(main())
