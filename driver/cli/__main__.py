"""`python -m driver.cli`: the `gpu-dra` command."""

import sys

from driver.cli.main import main

sys.exit(main())
