"""``visionselector train`` as the command line runs it, for tests that start it under torchrun.

Arguments are the command's. Each process also writes the scorer weights it ends with to
``OUT/rank{R}.safetensors``, so a test can compare the processes. With
``VS_TEST_STOP_AT_STEP=N`` every process kills itself (SIGKILL: nothing after it runs) when
step N (1-based) is about to begin.
"""

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

import visionselector.training as training
from visionselector.cli import main

stop_at = int(os.environ.get("VS_TEST_STOP_AT_STEP", "0"))
out = Path(sys.argv[sys.argv.index("--out") + 1])

ending_check = training.check_same_weights


def record_weights(parameters, group):
    save_file({str(i): p.detach().contiguous() for i, p in enumerate(parameters)}, out / f"rank{group.rank}.safetensors")
    return ending_check(parameters, group)


training.check_same_weights = record_weights

if stop_at:
    weight = training.CurriculumSchedule.weight

    def stopping_weight(self, step):
        if step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return weight(self, step)

    training.CurriculumSchedule.weight = stopping_weight

sys.exit(main(sys.argv[1:]))
