"""Command-line tools, run on a workstation or in CI, never in the operator pod: ``moe`` (``main``),
its ``place`` and ``plan`` subcommands and ``crd`` (the CRD YAML generated from ``api``).
"""
