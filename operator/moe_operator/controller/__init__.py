"""What runs in the operator pod: the kopf handlers (``main``), the reconcile pass (``reconcile``),
pure builders of the objects it applies (``resources``), the Kubernetes client (``kube``), leader
election (``election``), load-driven scaling decisions (``scaling``) and Prometheus ``metrics``.
"""
