"""Job entry point: render semantic masks (PNG + Parquet) with Ray tasks, resuming finished shards.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/masks.py --annotations /shared/rayseg/subset.json --out s3://BUCKET/rayseg/masks

Takes the same flags and --config as `rayseg masks`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("masks"))
