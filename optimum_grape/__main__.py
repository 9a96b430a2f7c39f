"""`python -m optimum_grape ...` is the same as the `optimum-grape` command."""

import sys

from .cli import main

sys.exit(main())
