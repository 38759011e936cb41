"""Generate the MoEDeployment CRD from the pydantic models in `api`.

We walk the models' fields ourselves instead of post-processing pydantic's JSON Schema: a
structural OpenAPI v3.0 schema wants inlined objects, `default: {}` on nested objects so their
own defaults apply, boolean `exclusiveMinimum`, and CEL rules; all are simpler to emit directly.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from moe_operator import api


def _constraints(meta: list[Any], out: dict[str, Any]) -> None:
    for m in meta:
        if isinstance(m, annotated_types.Ge):
            out["minimum"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            out["minimum"] = m.gt
            out["exclusiveMinimum"] = True
        elif isinstance(m, annotated_types.Le):
            out["maximum"] = m.le
        elif isinstance(m, annotated_types.Lt):
            out["maximum"] = m.lt
            out["exclusiveMaximum"] = True
        elif isinstance(m, annotated_types.MinLen):
            out["minItems" if out.get("type") == "array" else "minLength"] = m.min_length
        elif isinstance(m, annotated_types.MaxLen):
            out["maxItems" if out.get("type") == "array" else "maxLength"] = m.max_length
        elif hasattr(m, "pattern") and getattr(m, "pattern", None):
            out["pattern"] = m.pattern
        elif isinstance(m, FieldInfo):
            _constraints(list(m.metadata), out)


def _schema(tp: Any, meta: list[Any] | None = None) -> dict[str, Any]:
    meta = list(meta or [])
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        return _schema(base, meta + extra)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _schema(args[0], meta)
        if all(typing.get_origin(a) is Literal for a in args):
            vals = [v for a in args for v in typing.get_args(a)]
            return _schema(Literal[tuple(vals)], meta)  # type: ignore[misc]
        raise TypeError(f"unsupported union {tp}")
    out: dict[str, Any]
    if origin is Literal:
        vals = list(typing.get_args(tp))
        out = {"type": "string", "enum": vals}
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        out = model_schema(tp)
    elif origin is list:
        (item,) = typing.get_args(tp)
        out = {"type": "array", "items": _schema(item)}
    elif origin is dict:
        _, val = typing.get_args(tp)
        out = {"type": "object", "additionalProperties": _schema(val)}
    elif tp is bool:
        out = {"type": "boolean"}
    elif tp is int:
        out = {"type": "integer", "format": "int64"}
    elif tp is float:
        out = {"type": "number"}
    elif tp is str:
        out = {"type": "string"}
    else:
        raise TypeError(f"unsupported type {tp}")
    _constraints(meta, out)
    return out


def _plain(default: Any) -> Any:
    """A default as it is written in YAML: models as their aliased fields, unset ones left out."""
    if isinstance(default, BaseModel):
        return default.model_dump(by_alias=True, exclude_none=True)
    if isinstance(default, list):
        return [_plain(d) for d in default]
    return default


def model_schema(model: type[BaseModel], defaults: bool = True) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        alias = field.alias or name
        s = _schema(field.annotation, list(field.metadata))
        if field.description:
            s = {"description": field.description, **s}
        if field.is_required():
            required.append(alias)
        elif not defaults:
            pass
        elif field.default_factory is not None:
            # A nested object defaults to its fully defaulted value: the API server checks CEL
            # rules against defaults, so `{}` would fail rules that read the object's fields.
            s["default"] = _plain(field.default_factory())
        elif field.default is not None:
            s["default"] = field.default
        props[alias] = s
    out: dict[str, Any] = {"type": "object"}
    if model.__doc__:
        out["description"] = " ".join(model.__doc__.split())
    out["properties"] = props
    if required:
        out["required"] = required
    rules = model.__dict__.get("cel") or []
    if rules:
        out["x-kubernetes-validations"] = [dict(r) for r in rules]
    return out


def crd() -> dict[str, Any]:
    spec = model_schema(api.MoEDeploymentSpec)
    status = model_schema(api.MoEDeploymentStatus, defaults=False)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "moe"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "EP", "type": "integer", "jsonPath": ".spec.parallelism.expertParallelSize"},
                    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                    {"name": "Imbalance", "type": "number", "jsonPath": ".status.imbalance"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "MoEDeployment runs a DeepSeek-V3-class Mixture-of-Experts model with large "
                                   "expert parallelism: one pod per GPU, experts placed across nodes by topology.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                    "required": ["spec"],
                    "x-kubernetes-validations": [dict(r) for r in api.ROOT_CEL],
                }},
            }],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `moe crd` from moe_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
