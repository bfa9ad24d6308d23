"""``python -m dreamoving_core.data prepare SRC OUT``: see :mod:`dreamoving_core.data.cli`."""
import sys

from .cli import main

if __name__ == "__main__":  # importing this module (as the import-everything test does) runs nothing
    sys.exit(main())
