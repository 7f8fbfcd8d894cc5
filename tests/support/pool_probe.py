"""Master-side probe, loaded as an extra locustfile (`-f locustfile.py,pool_probe.py`): counts
every worker-protocol message the master receives and sends, by type, second and size, and
serves the counts at GET /pool-probe as {"in"|"out": {type: {second: [messages, bytes]}}}.
It wraps locust.rpc.protocol.Message's (un)serialize, which on a master run once per message
received and once per message sent."""
import collections
import time

from locust import events
from locust.rpc import protocol
from locust.runners import MasterRunner

COUNTS = {"in": collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0])),
          "out": collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))}


def _count(direction, mtype, size):
    c = COUNTS[direction][mtype][int(time.time())]
    c[0] += 1
    c[1] += size


@events.init.add_listener
def _install(environment, **_kw):
    if not isinstance(environment.runner, MasterRunner) or environment.web_ui is None:
        return
    serialize, unserialize = protocol.Message.serialize, protocol.Message.unserialize.__func__

    def counted_serialize(self):
        data = serialize(self)
        _count("out", self.type, len(data))
        return data

    def counted_unserialize(cls, data):
        msg = unserialize(cls, data)
        _count("in", msg.type, len(data))
        return msg

    protocol.Message.serialize = counted_serialize
    protocol.Message.unserialize = classmethod(counted_unserialize)

    @environment.web_ui.app.route("/pool-probe")
    def _probe():
        return {d: {t: {str(s): v for s, v in per.items()} for t, per in types.items()} for d, types in COUNTS.items()}
