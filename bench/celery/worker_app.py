"""The Celery app of the benchmark's Celery worker: one task, `bench.echo`, that returns
what Gantry's echo executor returns ({"args", "kwargs"}), acked late, results by rpc://."""

import os

from celery import Celery

app = Celery("gantry-bench-worker", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=os.environ["CELERY_QUEUE"],
    control_exchange=os.environ["CELERY_CONTROL_EXCHANGE"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
)


@app.task(name="bench.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}
