"""The benchmark's Celery client: the same for a Celery worker and for Gantry.

    driver.py BURST SERIAL
prints one JSON line: {"burst": {...}, "serial": {...}}, each {"n", "seconds", "latencies"}
(seconds). Burst: BURST tasks sent at once, then gathered as their results arrive; its
latencies are send -> result and hold the wait in the queue. Serial: SERIAL tasks one at a
time (send, get), so its latencies are one task's round trip.
"""

import json
import os
import sys
import time

from celery import Celery
from celery.result import ResultSet

app = Celery("gantry-bench-client", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=os.environ["CELERY_QUEUE"],
    control_exchange=os.environ["CELERY_CONTROL_EXCHANGE"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


def burst(n):
    sent = {}
    results = []
    started = time.monotonic()
    for i in range(n):
        result = app.send_task("bench.echo", args=[i])
        sent[result.id] = time.monotonic()
        results.append(result)
    arrived = {}

    def on_result(task_id, value):
        arrived[task_id] = time.monotonic()

    ResultSet(results).join_native(callback=on_result, timeout=1800)
    ended = max(arrived.values())
    return {
        "n": n,
        "seconds": ended - started,
        "latencies": [arrived[i] - sent[i] for i in sent],
    }


def serial(n):
    latencies = []
    started = time.monotonic()
    for i in range(n):
        t = time.monotonic()
        value = app.send_task("bench.echo", args=[i]).get(timeout=600)
        assert value == {"args": [i], "kwargs": {}}, value
        latencies.append(time.monotonic() - t)
    return {"n": n, "seconds": time.monotonic() - started, "latencies": latencies}


print(json.dumps({"burst": burst(int(sys.argv[1])), "serial": serial(int(sys.argv[2]))}), flush=True)
