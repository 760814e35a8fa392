"""``python -m dptrain``: the same as the ``dptrain`` command."""
import sys

from .cli import main

sys.exit(main())
