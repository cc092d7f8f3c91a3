"""A Celery-style task as a `command` executor: the task on stdin, the result on stdout.

kwargs: "sleep" seconds first; "fail" a message to fail with (on stderr, exit 1);
otherwise the result is {"sum": sum(args)}.
"""

import json
import sys
import time

task = json.load(sys.stdin)
kwargs = task["payload"]["kwargs"]
time.sleep(kwargs.get("sleep", 0))
if "fail" in kwargs:
    print(kwargs["fail"], file=sys.stderr)
    sys.exit(1)
print(json.dumps({"sum": sum(task["payload"]["args"])}))
