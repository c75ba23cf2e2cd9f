"""ONNX rewrites that ncnn needs before pnnx sees the model (the input model is never edited).

``Gather`` along an axis with the constant indices ``arange(dim)`` (in any shape) selects every
element in order: it is a ``Reshape``. torch's dynamo exporter emits exactly that for
``as_strided`` views (EfficientNet-Lite's flatten before the classifier), onnxslim keeps it, and
ncnn has no Gather layer, so pnnx's output would not load. We replace it by the Reshape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _static_shapes(model: object) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [int(d.dim_value) for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def fold_identity_gathers(src: Path, dst: Path) -> list[str]:
    """Copy ``src`` to ``dst`` with identity Gathers replaced by Reshapes.

    Returns:
        The names of the rewritten nodes (empty: ``dst`` is a plain copy).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    shapes = _static_shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    rewritten = []
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        data_shape = shapes.get(node.input[0])
        if data_shape is None:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        axis = axis % len(data_shape)
        idx = numpy_helper.to_array(inits[node.input[1]])
        if idx.size != data_shape[axis] or not np.array_equal(idx.ravel(), np.arange(idx.size)):
            continue
        new_shape = data_shape[:axis] + list(idx.shape) + data_shape[axis + 1:]
        shape_name = f"{node.output[0]}__edgeship_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(new_shape, np.int64), shape_name))
        name = node.name or node.output[0]
        node.op_type = "Reshape"
        node.input[1] = shape_name
        del node.attribute[:]
        rewritten.append(name)
    onnx.save(model, str(dst))
    return rewritten
