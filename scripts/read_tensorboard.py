#!/usr/bin/env python3
"""Read a TensorBoard log directory with TensorBoard's own reader
(EventAccumulator, the code behind `tensorboard --logdir`) and print its
scalars as JSON: {"tag": [[step, value], ...], ...}. The integration test
`tensorboard::python_reader_sees_every_logged_metric` compares this against
metrics.jsonl; it skips when the `tensorboard` package is missing.

    python3 scripts/read_tensorboard.py RUN/tensorboard
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {
    tag: [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in acc.Tags()["scalars"]
}
json.dump(out, sys.stdout, sort_keys=True)
