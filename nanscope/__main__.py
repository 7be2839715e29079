"""`python -m nanscope ...`."""

import sys

from nanscope.cli import main

sys.exit(main())
