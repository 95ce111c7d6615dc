"""SIEM outputs of the detection service: JSON lines files, syslog, Splunk HEC, Elasticsearch.

    config.py   the [[output]] tables checked and made into outputs (outputs_from_config)
    base.py     what every output has: bounded queue, sender task, rendering, retries
    jsonl.py    JSON lines to a file or stdout, exactly once: batch marks, the service's
                OutputGate and take_back
    syslog.py   RFC 5424 over TCP or TLS
    http.py     Splunk HEC and Elasticsearch _bulk
    metrics.py  the outputs' counters for /metrics

Each output renders items in its schema (service/schemas/). submit() must be called on the
event loop's thread (the aiohttp handlers are).
"""
