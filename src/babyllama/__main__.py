"""`python -m babyllama STAGE ...`: the same command as `babyllama STAGE ...`."""

import sys

from babyllama.cli import main

sys.exit(main())
