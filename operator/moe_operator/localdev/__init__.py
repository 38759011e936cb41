"""The local development cluster, for tests, benchmarks and ``make demo``; never in the operator pod:
a control plane (``devcluster``), a small kubelet that runs runner nodes' pods as local processes
(``localrunner``), Prometheus (``devprom``), a load generator (``loadgen``) and the ``demo``.
"""
