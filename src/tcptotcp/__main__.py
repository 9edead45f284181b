"""python -m tcptotcp: the port forwarder (see tcptotcp --help)."""

import sys

from .cli import main

sys.exit(main())
