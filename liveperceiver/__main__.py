"""`python -m liveperceiver ...` (also what `torchrun -m liveperceiver train ...` runs)."""

import sys

from liveperceiver.cli import main

sys.exit(main())
