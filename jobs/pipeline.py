"""Job entry point: the whole chain: subset, masks, train, evaluate, predict.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/coco8k.yaml

Takes the same flags and --config as `rayseg pipeline`; exits non-zero on failure.
"""

import sys

from _common import run_command

if __name__ == "__main__":
    sys.exit(run_command("pipeline"))
