"""`python -m babyllama.cli STAGE ...` (what launchers run: `torchrun -m babyllama.cli pretrain ...`)."""

import sys

from babyllama.cli import main

sys.exit(main())
