"""What qat-train prints while Ray Train workers run: the trial's own lines, without Ray's prefixes
and colours; the Train controller's and core workers' lines dropped (issue 19)."""

from __future__ import annotations

import io

from orchestrator.console import WorkerLines


def test_worker_lines_keep_the_trials_own_lines_only():
    out = io.StringIO()
    stream = WorkerLines(out)
    stream.write("\x1b[36m(TrainController pid=23160)\x1b[0m [2026-12-05 09:27:45,144 E 23160 23188] core_worker.cc:2465: "
                 "Actor with class name: 'PreemptionWatcher' ...\n")
    stream.write("\x1b[36m(RayTrainWorker pid=23302)\x1b[0m [r] epoch 1/2  loss 0.0165\n(RayTrainWorker pid=23302, "
                 "ip=10.0.0.7) [r] epoch 2/2")  # a line written in two parts, from another node
    stream.write("  loss 0.0029\n(RayTrainWorker pid=23302) Traceback (most recent call last):\n")
    stream.write("test split   acc\n")  # the program's own line
    assert out.getvalue() == "[r] epoch 1/2  loss 0.0165\n[r] epoch 2/2  loss 0.0029\ntest split   acc\n"
