"""Job entry point: select a deterministic COCO image subset.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/subset.py --annotations /shared/coco/instances_train2017.json \
        --out /shared/rayseg/subset.json --num-images 8000

Takes the same flags and --config as `rayseg subset`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("subset"))
