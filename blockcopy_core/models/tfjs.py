"""Read a TensorFlow.js graph model (``model.json`` + weight shards) into numpy arrays and nodes.

A TFJS graph model is a JSON file holding the frozen TensorFlow graph (``modelTopology.node``) and a
``weightsManifest`` that lists, group by group, the shard files and the tensors stored back to back in
them. Each tensor is stored in its ``dtype`` unless it has a ``quantization`` entry: then it is stored
as float16, or as uint8/uint16 with an affine ``scale``/``min``, and dequantised here to its dtype.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_STORED_DTYPES = {
    "float32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "float16": np.float16,
    "uint8": np.uint8,
    "uint16": np.uint16,
}


class TfjsFormatError(ValueError):
    """A TFJS model file is missing, unreadable or inconsistent with its manifest."""


@dataclass
class TfjsNode:
    """One node of the graph: its op, the names of its inputs and its decoded attributes."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TfjsGraph:
    """A TFJS graph model: nodes in file order, weights by name, and the signature's I/O names."""

    nodes: list[TfjsNode]
    weights: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]

    def node(self, name: str) -> TfjsNode:
        """The node called ``name`` (KeyError if the graph has none)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"graph has no node {name!r}")


def decode_attr(value: dict[str, Any]) -> Any:
    """Turn one protobuf-JSON ``AttrValue`` into a Python value.

    Strings (base64 in the JSON) become ``str``, ints ``int``, lists Python lists, dtypes their
    ``DT_*`` name; shapes and tensors are returned as their JSON dicts.
    """
    if "list" in value:
        items = value["list"]
        if "s" in items:
            return [base64.b64decode(s).decode() for s in items["s"]]
        if "i" in items:
            return [int(i) for i in items["i"]]
        if "f" in items:
            return [float(f) for f in items["f"]]
        if "type" in items:
            return list(items["type"])
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    for key in ("shape", "tensor", "func"):
        if key in value:
            return value[key]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"TFJS model file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TfjsFormatError(f"cannot parse TFJS model JSON {path}: {error}") from error


def _tensor_bytes(spec: dict[str, Any]) -> tuple[np.dtype, int]:
    """The stored numpy dtype of one manifest entry and the byte size of its data."""
    quantization = spec.get("quantization")
    stored = quantization["dtype"] if quantization else spec["dtype"]
    if stored not in _STORED_DTYPES:
        raise TfjsFormatError(f"unsupported stored dtype {stored!r} of weight {spec['name']!r}")
    dtype = np.dtype(_STORED_DTYPES[stored])
    count = int(np.prod(spec["shape"], dtype=np.int64))
    return dtype, count * dtype.itemsize


def _decode_tensor(spec: dict[str, Any], data: bytes) -> np.ndarray:
    """Decode one manifest entry's bytes into an array of its (dequantised) dtype and shape."""
    stored_dtype, _ = _tensor_bytes(spec)
    array = np.frombuffer(data, dtype=stored_dtype).reshape(spec["shape"])
    quantization = spec.get("quantization")
    target = np.dtype(_STORED_DTYPES[spec["dtype"]])
    if quantization and quantization["dtype"] in ("uint8", "uint16"):
        array = array.astype(np.float32) * quantization["scale"] + quantization["min"]
    return array.astype(target)


def _read_group(group: dict[str, Any], folder: Path) -> dict[str, np.ndarray]:
    """Read one manifest group: its shards concatenated, split into its tensors."""
    paths = [folder / name for name in group["paths"]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"TFJS weight file not found: {path}")
    buffer = b"".join(path.read_bytes() for path in paths)
    sizes = [_tensor_bytes(spec)[1] for spec in group["weights"]]
    if sum(sizes) != len(buffer):
        names = ", ".join(str(path) for path in paths)
        raise TfjsFormatError(
            f"TFJS weight file(s) {names} hold {len(buffer)} bytes but the manifest lists {sum(sizes)}"
        )
    tensors = {}
    offset = 0
    for spec, size in zip(group["weights"], sizes):
        tensors[spec["name"]] = _decode_tensor(spec, buffer[offset : offset + size])
        offset += size
    return tensors


def load_tfjs_graph(json_path: str | Path) -> TfjsGraph:
    """Read a TFJS graph model; the weight shards are looked up next to the JSON file.

    Args:
        json_path: the model's JSON file (``format`` "graph-model").

    Returns:
        The graph's nodes with decoded attributes, every manifest tensor as a numpy array (float16
        storage dequantised to float32), and the input/output names of the signature.
    """
    json_path = Path(json_path)
    model = _read_json(json_path)
    try:
        raw_nodes = model["modelTopology"]["node"]
        manifest = model["weightsManifest"]
    except (KeyError, TypeError) as error:
        raise TfjsFormatError(f"{json_path} is not a TFJS graph model (missing {error})") from error
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        weights.update(_read_group(group, json_path.parent))
    nodes = [
        TfjsNode(
            name=raw["name"],
            op=raw["op"],
            inputs=list(raw.get("input", [])),
            attrs={key: decode_attr(value) for key, value in raw.get("attr", {}).items()},
        )
        for raw in raw_nodes
    ]
    signature = model.get("signature", {})
    return TfjsGraph(
        nodes=nodes,
        weights=weights,
        inputs=list(signature.get("inputs", {})),
        outputs=list(signature.get("outputs", {})),
    )
