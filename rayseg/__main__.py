import sys

from rayseg.cli import main

sys.exit(main())
