"""Job entry point: train a segmentation model with Ray Train, resuming from the last checkpoint.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --data s3://BUCKET/rayseg/masks --out s3://BUCKET/rayseg/train \
        --num-workers 2 --use-gpu

Takes the same flags and --config as `rayseg train`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("train"))
