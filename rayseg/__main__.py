import sys

from rayseg.cli import main

if __name__ == "__main__":  # not when a spawned child process re-imports it (rayseg.coco_apart)
    sys.exit(main())
