"""Runs oteltest's OTLP/HTTP receiver (`oteltest.sink.HttpSink`, from PyPI) on the port
given, and prints each span it receives as one JSON line on stdout, for the tests of
Gantry's span export (tests/src/otlp.rs).

    receiver.py PORT

The first line, {"listening": PORT}, says it takes requests.
"""

import json
import logging
import sys
import time

from oteltest.sink import HttpSink
from oteltest.sink.handler import RequestHandler


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Lines(RequestHandler):
    """Each span as a JSON line: ids in hex, its service, its attributes."""

    def handle_logs(self, request, headers):
        pass

    def handle_metrics(self, request, headers):
        pass

    def handle_trace(self, request, headers):
        for resource_spans in request.resource_spans:
            resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    line = {
                        "service": resource.get("service.name"),
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": {a.key: value_of(a.value) for a in span.attributes},
                    }
                    print(json.dumps(line), flush=True)


def main():
    port = int(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    sink = HttpSink(Lines(), logging.getLogger("otelsink"), port=port)
    sink.start()
    while sink.httpd is None:
        time.sleep(0.01)
    print(json.dumps({"listening": port}), flush=True)
    sink.svr_thread.join()


if __name__ == "__main__":
    main()
