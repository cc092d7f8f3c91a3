"""A Celery client, as a backend would use one, driven one JSON line at a time.

Each line on stdin is a command; each answer is one JSON line on stdout. The app is
configured only as docs/celery.md says: broker, rpc:// results, JSON, the queue and the
control exchange.

    {"op": "send", "name": "proj.add", "args": [1, 2], "kwargs": {}, "options": {...}}
        -> {"id": ...}; options go to send_task (countdown, expires, time_limit, ...);
           "expires_in": seconds from now (negative: already expired)
    {"op": "get", "id": ..., "timeout": 60}
        -> {"state": ..., "result": ...} or {"state", "exc_type", "exc_module", "exc"}
    {"op": "state", "id": ...}   -> {"state": ...}
    {"op": "revoke", "id": ..., "terminate": false} -> {"ok": true}
    {"op": "many", "name": ..., "count": 1000, "timeout": 300}
        -> {"sent": n, "gathered": n, "wrong": n, "seconds": s}
    {"op": "raw", "kind": "protocol1" | "pickle" | "malformed", "name": ...} -> {"id": ...}
"""

import datetime
import json
import os
import sys
import time
import uuid

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Connection, Producer


def app(**overrides):
    celery = Celery("gantry-test-client", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
    celery.conf.update(
        task_default_queue=os.environ["CELERY_QUEUE"],
        control_exchange=os.environ["CELERY_CONTROL_EXCHANGE"],
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    celery.conf.update(overrides)
    return celery


APP = app()
SENT = {}


def send(cmd):
    options = dict(cmd.get("options", {}))
    if "expires_in" in options:
        seconds = options.pop("expires_in")
        options["expires"] = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    result = APP.send_task(cmd["name"], args=cmd.get("args", []), kwargs=cmd.get("kwargs", {}), **options)
    SENT[result.id] = result
    return {"id": result.id}


def get(cmd):
    result = SENT.get(cmd["id"]) or APP.AsyncResult(cmd["id"])
    try:
        value = result.get(timeout=cmd.get("timeout", 60))
        return {"state": result.state, "result": value}
    except CeleryTimeout:
        return {"timeout": True, "state": result.state}
    except Exception as exc:  # what get() raises is the point
        return {
            "state": result.state,
            "exc_type": type(exc).__name__,
            "exc_module": type(exc).__module__,
            "exc": str(exc),
        }


def many(cmd):
    count = cmd["count"]
    started = time.monotonic()
    results = [APP.send_task(cmd["name"], args=[i], kwargs={}) for i in range(count)]
    gathered = wrong = 0
    deadline = time.monotonic() + cmd.get("timeout", 300)
    for i, result in enumerate(results):
        value = result.get(timeout=max(1, deadline - time.monotonic()))
        gathered += 1
        if value != {"args": [i], "kwargs": {}}:
            wrong += 1
    return {"sent": count, "gathered": gathered, "wrong": wrong, "seconds": time.monotonic() - started}


def raw(cmd):
    """Messages a Celery client can send that Gantry refuses: the same client with other
    settings (protocol 1, pickle), or a protocol 2 message with a bad header."""
    kind = cmd["kind"]
    if kind == "protocol1":
        return {"id": app(task_protocol=1).send_task(cmd["name"], args=[1]).id}
    if kind == "pickle":
        other = app(task_serializer="pickle", accept_content=["pickle", "json"])
        return {"id": other.send_task(cmd["name"], args=[1]).id}
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": cmd["name"], "id": task_id, "eta": "not a time", "retries": 0}
    with Connection(os.environ["CELERY_BROKER_URL"]) as conn:
        Producer(conn).publish(
            [[1], {}, {}],
            routing_key=os.environ["CELERY_QUEUE"],
            serializer="json",
            headers=headers,
            correlation_id=task_id,
        )
    return {"id": task_id}


OPS = {
    "send": send,
    "get": get,
    "state": lambda cmd: {"state": (SENT.get(cmd["id"]) or APP.AsyncResult(cmd["id"])).state},
    "revoke": lambda cmd: APP.control.revoke(cmd["id"], terminate=cmd.get("terminate", False)) or {"ok": True},
    "many": many,
    "raw": raw,
}

for line in sys.stdin:
    command = json.loads(line)
    try:
        answer = OPS[command["op"]](command)
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer, default=str), flush=True)
