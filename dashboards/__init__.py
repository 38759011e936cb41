"""Grafana dashboards for moe-operator, built from code with grafana-foundation-sdk.

`python -m dashboards` writes the JSON the Helm chart ships (charts/moe-operator/dashboards/);
`python -m dashboards --check` fails when the committed JSON differs from a fresh build.
`dashboards.promql` extracts every panel's PromQL from the JSON (for tests against Prometheus).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "charts" / "moe-operator" / "dashboards"


def builders() -> dict[str, Callable]:
    """File stem -> builder of the dashboard (imported lazily: only building needs the SDK)."""
    from . import controller, experts, serving

    return {"moe-serving": serving.build, "moe-experts": experts.build, "moe-operator": controller.build}


def render(build: Callable) -> str:
    """The dashboard as the JSON text the chart ships: stable key order, two-space indent."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    doc = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    _number_panels(doc)
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _number_panels(doc: dict) -> None:
    """Give every panel and row a stable id (Grafana needs them unique within a dashboard)."""
    n = 0
    for p in doc.get("panels", []):
        n += 1
        p["id"] = n
        for sub in p.get("panels", []):
            n += 1
            sub["id"] = n


def build_all() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {f"{stem}.json": render(b) for stem, b in builders().items()}


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in build_all().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Files that a fresh build would change, add or remove."""
    fresh = build_all()
    have = {p.name for p in out_dir.glob("*.json")}
    out = [n for n, t in fresh.items() if not (out_dir / n).exists() or (out_dir / n).read_text() != t]
    return sorted(out + [n for n in have - set(fresh)])
