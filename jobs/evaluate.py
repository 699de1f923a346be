"""Job entry point: score a trained model on a masks dataset.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --checkpoint s3://BUCKET/rayseg/train \
        --data s3://BUCKET/rayseg/masks-val --out s3://BUCKET/rayseg/eval

Takes the same flags and --config as `rayseg evaluate`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate"))
