"""Print the scalars of a TensorBoard log directory as TensorBoard itself
reads them: {tag: [[step, value], ...]} as JSON on stdout.

Used by tests/tensorboard.rs: the reader is the `tensorboard` package's
EventAccumulator, which checks each record's CRC, parses the Event protos,
and drops the points a restarted run's SessionLog START event orphans.
"""

import json
import math
import sys

from tensorboard.backend.event_processing import event_accumulator as ea

acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})
acc.Reload()
out = {
    tag: [[e.step, None if math.isnan(e.value) else e.value] for e in acc.Scalars(tag)]
    for tag in acc.Tags()["scalars"]
}
print(json.dumps(out))
