"""``python -m dreamoving_core.data prepare SRC OUT``: see :mod:`dreamoving_core.data.cli`."""
import sys

from .cli import main

sys.exit(main())
