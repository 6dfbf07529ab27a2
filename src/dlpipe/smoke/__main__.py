"""`python -m dlpipe.smoke`: see `dlpipe.smoke.run`."""

import sys

from dlpipe.smoke.run import main

sys.exit(main())
