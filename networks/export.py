"""Deployment files of a network: a ``torch.export`` program and an ONNX model, both with a
dynamic batch dimension, written atomically; the ONNX file checked in onnxruntime.

A failed export names the layer it failed in (the innermost module of the network on the
failing call stack) and the reason; it is never skipped silently.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write

ONNX_OPSET = 18


class ExportError(RuntimeError):
    """A network could not be exported; the message names the layer and the reason."""


def _failing_layer(network: nn.Module, error: BaseException) -> str | None:
    """``path (Class)`` of the innermost module of ``network`` on the failing call stack."""
    names = {id(m): n for n, m in network.named_modules()}
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found, tb = None, current.__traceback__
        while tb is not None:
            obj = tb.tb_frame.f_locals.get("self")
            if id(obj) in names:
                found = f"{names[id(obj)] or '<the network itself>'} ({type(obj).__name__})"
            tb = tb.tb_next
        if found:
            return found
        current = current.__cause__ or current.__context__
    return None


def _export_error(kind: str, network: nn.Module, error: BaseException) -> ExportError:
    layer = _failing_layer(network, error)
    while error.__cause__ is not None:  # the exporters wrap the tracer's error: report that one
        error = error.__cause__
    reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    where = f" in layer {layer}" if layer else ""
    return ExportError(f"{kind} export failed{where}: {type(error).__name__}: {reason[:300]}")


def export_program(network: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """``torch.export`` the network (eval mode, any batch size) to a ``.pt2`` that loads with
    plain PyTorch: ``torch.export.load(path).module()(x)``."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(network.eval(), (example.repeat(2, 1, 1, 1),),
                                      dynamic_shapes=({0: batch},))
    except Exception as e:
        raise _export_error("torch.export", network, e) from e
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


def export_onnx(network: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                opset: int = ONNX_OPSET) -> Path:
    """The network as an ONNX model (eval mode, dynamic batch, ``opset``), input ``images``,
    output ``logits``; written atomically."""
    def write(tmp: str) -> None:
        torch.onnx.export(network.eval(), (example.repeat(2, 1, 1, 1),), tmp, dynamo=True,
                          input_names=["images"], output_names=["logits"], opset_version=opset,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                          external_data=False)

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            return atomic_write(path, write)
    except Exception as e:
        raise _export_error("ONNX", network, e) from e


_CHECK = """
import json, sys
import numpy as np
import onnxruntime as ort
data = np.load(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
print(json.dumps({"max_abs_diff": float(np.abs(out - data["y"]).max()),
                  "onnxruntime": ort.__version__}))
"""


def check_onnx(path: str | os.PathLike, network: nn.Module, inputs: torch.Tensor,
               atol: float = 1e-4) -> dict:
    """Run the ONNX file in onnxruntime in a fresh process (nothing of this process or project
    loaded) on ``inputs`` and compare with ``network``'s outputs; returns ``{"max_abs_diff",
    "onnxruntime"}``, raises :class:`ExportError` when they differ by more than ``atol``."""
    with torch.no_grad():
        expected = network.eval()(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "io.npz"
        np.savez(data, x=inputs.numpy(), y=expected.numpy())
        # the check runs in the temporary folder: a relative path is resolved here first
        done = subprocess.run([sys.executable, "-c", _CHECK, str(Path(path).resolve()), str(data)],
                              capture_output=True, text=True, cwd=tmp)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
        raise ExportError(f"onnxruntime could not run {str(path)!r}: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["max_abs_diff"] <= atol:
        raise ExportError(f"{str(path)!r} in onnxruntime differs from the PyTorch network by "
                          f"{result['max_abs_diff']:.3g} (> {atol:g})")
    return result
