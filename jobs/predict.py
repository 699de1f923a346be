"""Job entry point: batch inference with Ray Data.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/predict.py --checkpoint s3://BUCKET/rayseg/train \
        --images /shared/coco/val2017 --out s3://BUCKET/rayseg/predict

Takes the same flags and --config as `rayseg predict`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("predict"))
