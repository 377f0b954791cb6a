"""A trained network as ONNX (and OpenVINO IR): eval mode, one output, dynamic batch, the plan's patch.

`export_onnx` traces the network with torch's TorchScript-based exporter (`torch.onnx.export(...,
dynamo=False)`): on torch 2.13 the default torch.export-based exporter needs the `onnxscript`
package, which medseg3d does not depend on, and the traced graph of our networks is plain ops.
Tracing runs on a CPU copy in contiguous memory, so every `InstanceNorm` takes its
`F.group_norm` path (exported as ONNX `InstanceNormalization`), never the channels-last autograd
Function or CUDA's instance norm. The input is `image` `(B, C, *patch)` float32 with B dynamic,
the output `logits` `(B, K, *patch)` float32 (2D configurations: the 2D patch).

`check_onnx` runs an export through onnxruntime and compares its softmax with torch's on a random
batch of 2 (so the dynamic batch is exercised); `onnx_to_openvino` converts an export to IR.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from medseg3d.errors import BackendError

log = logging.getLogger(__name__)

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "check_onnx", "export_onnx", "network_members", "onnx_to_openvino"]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: ONNX opset of the exports (onnxruntime >= 1.17 and OpenVINO >= 2024.0 run it).
OPSET = 17
#: Largest |softmax(onnx) - softmax(torch)| an export may show on the check batch.
CHECK_TOLERANCE = 1e-4


def export_onnx(model: nn.Module, in_channels: int, patch_size: Sequence[int], *, name: str = "network") -> bytes:
    """`model` (any medseg3d network; left unchanged) as ONNX bytes.

    in_channels: C of the input `(B, C, *patch_size)`; patch_size: the plan's patch (2 or 3 ints),
    fixed in the graph; the batch axis B is dynamic. The network is traced in eval mode, so deep
    supervision heads are not exported (one output `(B, K, *patch_size)` logits).
    BackendError naming `name` when tracing fails.
    """
    net = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros((2, int(in_channels), *(int(p) for p in patch_size)), dtype=torch.float32)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_output():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(net, (x,), buf, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=OPSET, do_constant_folding=True)
    except ImportError as exc:
        raise BackendError(f"exporting {name} to ONNX needs the onnx package ({exc}); "
                           "`pip install \"medseg3d[onnx]\"`") from exc
    except Exception as exc:  # torch raises many types here; the user gets one message
        raise BackendError(f"{name} ({type(model).__name__}) cannot be exported to ONNX ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:240]}); predict it with --backend torch, or export without --format") from exc
    return buf.getvalue()


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """File descriptors 1 and 2 sent to a temporary file: the TorchScript exporter prints the whole traced
    graph from C++ (C stdio) when an operator does not convert; the user gets the one-line BackendError."""
    import ctypes
    import os
    import sys
    import tempfile

    try:
        fds = [sys.stdout.fileno(), sys.stderr.fileno()]
    except (AttributeError, OSError, ValueError):  # streams replaced by objects without a descriptor
        yield
        return
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile() as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            libc.fflush(None)
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)


def check_onnx(onnx_bytes: bytes, model: nn.Module, in_channels: int, patch_size: Sequence[int], *,
               name: str = "network", seed: int = 0) -> float | None:
    """Max |softmax difference| between onnxruntime on `onnx_bytes` and torch fp32 on `model`, for one
    seeded random batch of 2 `(2, C, *patch)`; None (logged) when onnxruntime is not installed.

    BackendError when the difference exceeds `CHECK_TOLERANCE` (a wrong export is never shipped).
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("onnxruntime is not installed: the ONNX export of %s is not checked against torch", name)
        return None
    from medseg3d.inference.backends import OnnxRuntimeNetwork

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, int(in_channels), *(int(p) for p in patch_size)), generator=gen)
    net = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        ref = torch.softmax(net(x).float(), 1)
    got = torch.softmax(OnnxRuntimeNetwork(onnx_bytes, threads=torch.get_num_threads(), name=name)(x), 1)
    diff = float((got - ref).abs().max())
    if not diff <= CHECK_TOLERANCE:
        raise BackendError(f"the ONNX export of {name} gives probabilities {diff:.2e} away from torch's (tolerance "
                           f"{CHECK_TOLERANCE:g}); this architecture does not export faithfully: use --backend torch "
                           "and export without --format")
    return diff


def onnx_to_openvino(onnx_bytes: bytes, *, name: str = "network") -> tuple[bytes, bytes]:
    """An ONNX export as OpenVINO IR `(network.xml bytes, network.bin bytes)`, weights kept float32.

    BackendError when OpenVINO is not installed (`pip install "medseg3d[openvino]"`).
    """
    import tempfile
    from pathlib import Path

    import numpy as np

    ov = import_openvino()
    model = ov.Core().read_model(onnx_bytes, ov.Tensor(np.empty(0, dtype=np.uint8)))  # weights are inside the ONNX
    with tempfile.TemporaryDirectory(prefix="medseg3d_ov_") as tmp:
        xml = Path(tmp) / "network.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        log.debug("converted %s to OpenVINO IR", name)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def network_members(model: nn.Module, formats: Sequence[str], in_channels: int, patch_size: Sequence[int], *,
                    name: str = "network") -> dict[str, bytes]:
    """The exported files of `model` for `formats` (`onnx`: `network.onnx`; `openvino`: `network.xml`,
    `network.bin`), by file name. The ONNX export is checked against torch first (`check_onnx`)."""
    onnx = export_onnx(model, in_channels, patch_size, name=name)
    diff = check_onnx(onnx, model, in_channels, patch_size, name=name)
    if diff is not None:
        log.info("%s: the ONNX export agrees with torch (max probability difference %.1e)", name, diff)
    out = {}
    if "onnx" in formats:
        out["network.onnx"] = onnx
    if "openvino" in formats:
        out["network.xml"], out["network.bin"] = onnx_to_openvino(onnx, name=name)
    return out


def import_openvino():  # the openvino module (annotated loosely: it may not be installed)
    """The `openvino` module; BackendError saying how to install it when it is missing."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendError("OpenVINO is not installed; `pip install \"medseg3d[openvino]\"` (or pick --backend "
                           "torch / onnxruntime)") from exc
    return ov


def import_onnxruntime():  # the onnxruntime module (annotated loosely: it may not be installed)
    """The `onnxruntime` module; BackendError saying how to install it when it is missing."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError("onnxruntime is not installed; `pip install \"medseg3d[onnx]\"` (or pick --backend "
                           "torch)") from exc
    return ort
