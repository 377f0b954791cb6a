"""Network backends for inference: the fold networks as torch modules, onnxruntime or OpenVINO sessions.

A backend network is a drop-in for the call the sliding window makes (`sliding_window._run_batch`:
`logits = model(x)`): a `(B, C, *patch)` float32 batch in, `(B, K, *patch)` float32 logits out, as
torch tensors on the host. Windows, Gaussian weighting, mirror TTA (the flips around that call),
fold averaging and the export to the original grid therefore stay one code path whatever runs the
network. The onnxruntime and OpenVINO networks are `nn.Module`s without parameters, so code that
moves models (`.to(device).eval()`) leaves them as they are; they run on the CPU in float32 with
`torch.get_num_threads()` threads (onnxruntime `intra_op_num_threads`, OpenVINO
`INFERENCE_NUM_THREADS`).

Where the ONNX comes from (`to_backend`): the package member `fold_<K>/network.onnx` (or
`network.xml`/`.bin` for OpenVINO; `medseg3d export --format onnx|openvino`), or, for a WORK_DIR
checkpoint, an export made when the command starts (`onnx_export.export_onnx`, a few seconds per
fold) and kept in the user's cache (`cached_export`: `~/.cache/medseg3d/onnx/`, keyed by the
weights), so the next predict with the same checkpoint starts at once.

`--backend auto` (the default) picks `CPU_AUTO_ORDER`'s first installed backend on the CPU (float32)
unless bf16/fp16 was asked for by name (`--precision bf16|fp16`, which only torch runs); on CUDA,
torch. The list is empty for now (see it), so auto runs torch.

Fork safety: a forked child (DataLoader workers, evaluate's and the fingerprint's process pools) gets
a copy of every onnxruntime/OpenVINO object alive in the parent but none of their executor threads;
destroying such a copy there (a garbage collection in the worker) waits for those threads forever
(`CPUStreamsExecutor::~CPUStreamsExecutor` in `pthread_cond_destroy`: seen as a hung or crashed test
suite). `_keep_runtime_objects_in_child`, run after every fork in the child, therefore keeps them
referenced for the child's life: a child never runs them, and it ends with `os._exit`, without
destroying them.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from medseg3d.errors import BackendError, InputError
from medseg3d.inference.onnx_export import export_onnx, import_onnxruntime, import_openvino

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CPU_AUTO_ORDER",
    "OnnxRuntimeNetwork",
    "OpenVinoNetwork",
    "backend_of",
    "cache_dir",
    "cached_export",
    "installed_backends",
    "resolve_backend",
    "to_backend",
]

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
#: Backends `auto` tries, in order, for prediction on the CPU; empty or none installed = torch. Only a
#: backend measured faster than torch and agreeing with it (probabilities to 1e-3, identical labels) on
#: the held-out hippocampus cases goes here. OpenVINO passed that (docs/benchmarks.md, "Network
#: backends": 1.46x torch float32, 1.31x torch bf16 with TTA, largest probability difference 2.9e-6)
#: but is still held back: forked children no longer hang on the sessions they inherit (see the module
#: doc), yet a long process that ran OpenVINO sessions and then trained (the test suite with OpenVINO
#: as the default: tests/test_arch_cli.py, then test_demo.py) still died once with a segfault in the
#: parent, not reproduced in the next run. Until that is understood, `--backend openvino` is opt-in.
#: onnxruntime was slower than torch there.
CPU_AUTO_ORDER: tuple[str, ...] = ()

#: The onnxruntime/OpenVINO networks alive in this process (their sessions must outlive any fork of it).
_LIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
#: In a forked child: the runtime objects inherited from the parent, never destroyed (see the module doc).
_KEPT_IN_CHILD: list[object] = []


def _keep_runtime_objects_in_child() -> None:
    """`os.register_at_fork(after_in_child=...)`: hold every inherited session for the child's life."""
    for net in list(_LIVE):
        _KEPT_IN_CHILD.append(net.__dict__.copy())


os.register_at_fork(after_in_child=_keep_runtime_objects_in_child)


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX network run by onnxruntime's CPU execution provider: `(B, C, *patch)` -> `(B, K, *patch)` logits."""

    backend = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, *, threads: int, name: str = "network") -> None:
        super().__init__()
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
        try:
            self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
            raise BackendError(f"onnxruntime cannot load the ONNX network of {name} ({str(exc)[:300]}); "
                               "re-export it with this medseg3d (`medseg3d export ... --format onnx`)") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        _LIVE.add(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


class OpenVinoNetwork(nn.Module):
    """An ONNX or OpenVINO IR network compiled for OpenVINO's CPU plugin in float32 (no bf16 hint),
    latency mode: `(B, C, *patch)` -> `(B, K, *patch)` logits; the batch axis stays dynamic."""

    backend = "openvino"

    def __init__(self, model: bytes, weights: bytes | None = None, *, threads: int, name: str = "network") -> None:
        super().__init__()
        import numpy as np

        ov = import_openvino()
        core = ov.Core()
        blob = np.frombuffer(weights, dtype=np.uint8) if weights is not None else np.empty(0, np.uint8)
        try:
            read = core.read_model(model, ov.Tensor(blob))
            self.compiled = core.compile_model(read, "CPU", {
                "INFERENCE_NUM_THREADS": max(1, int(threads)), "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"OpenVINO cannot load the network of {name} ({str(exc)[:300]}); re-export it with "
                               "this medseg3d (`medseg3d export ... --format openvino`)") from exc
        self.request = self.compiled.create_infer_request()
        self.name = name
        _LIVE.add(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.request.infer({0: arr}, share_inputs=True)
        return torch.from_numpy(out[self.compiled.outputs[0]].copy())


def cache_dir() -> Path:
    """Where WORK_DIR networks' ONNX exports are kept: `$XDG_CACHE_HOME/medseg3d/onnx` (default `~/.cache`)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "medseg3d" / "onnx"


def cached_export(model: nn.Module, in_channels: int, patch_size: Sequence[int], *, name: str = "network") -> bytes:
    """`export_onnx(model, ...)`, kept in `cache_dir()` under the sha256 of what the export depends on
    (the weights, the module structure as `repr`, C, the patch, the opset, medseg3d's and torch's
    versions), so a WORK_DIR pays the export (seconds) once per checkpoint. A cache that cannot be
    read or written is skipped (logged at debug level); the export is then made in memory."""
    import hashlib
    import json

    from medseg3d import __version__
    from medseg3d.inference.onnx_export import OPSET

    h = hashlib.sha256(json.dumps([repr(model), int(in_channels), [int(p) for p in patch_size], OPSET, __version__,
                                   torch.__version__]).encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    path = cache_dir() / f"{h.hexdigest()[:32]}.onnx"
    try:
        data = path.read_bytes()
        log.debug("%s: ONNX export from the cache %s", name, path)
        return data
    except OSError:
        pass
    data = export_onnx(model, in_channels, patch_size, name=name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent predict reads the old file or the whole new one
    except OSError as exc:
        log.debug("ONNX export of %s not cached (%s)", name, exc)
    return data


def backend_of(models: Sequence[nn.Module]) -> str:
    """The backend `models` (from `to_backend`) run on: `torch` unless every one is a backend network
    (`--backend auto` keeps all folds on torch when one does not export)."""
    if models and all(isinstance(m, (OnnxRuntimeNetwork, OpenVinoNetwork)) for m in models):
        return str(models[0].backend)
    return "torch"


def installed_backends() -> list[str]:
    """`torch` plus each optional backend whose package is installed (found, not imported: importing
    openvino alone takes about a second)."""
    from importlib.util import find_spec

    return ["torch", *(b for b in ("onnxruntime", "openvino") if find_spec(b) is not None)]


def resolve_backend(backend: str, device: torch.device, amp_dtype: torch.dtype | None,
                    precision: str = "auto") -> str:
    """`backend` (auto|torch|onnxruntime|openvino) as the one that will run; `amp_dtype` is the
    resolved autocast dtype (`predictor.resolve_amp`), None for float32; `precision` the requested
    one (`--precision`: auto keeps `auto`'s CPU backend, an explicit bf16/fp16 keeps torch).

    InputError for an unknown name, or onnxruntime/openvino asked for on a non-CPU device;
    BackendError when the requested package is not installed.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown --backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu" or (amp_dtype is not None and precision != "auto"):
            return "torch"
        have = installed_backends() if CPU_AUTO_ORDER else []
        for chosen in (b for b in CPU_AUTO_ORDER if b in have):
            try:
                {"onnxruntime": import_onnxruntime, "openvino": import_openvino}[chosen]()
            except Exception as exc:  # a broken install: auto falls back rather than failing
                log.warning("--backend auto: %s is installed but does not import (%s); trying the next",
                            chosen, exc)
                continue
            log.info("--backend auto: %s runs the networks on the CPU in float32 (--backend torch for torch)", chosen)
            return chosen
        return "torch"
    if backend != "torch" and device.type != "cpu":
        raise InputError(f"--backend {backend} runs on the CPU; pass --device cpu (or --backend torch on {device})")
    if backend == "onnxruntime":
        import_onnxruntime()
    elif backend == "openvino":
        import_openvino()
    if backend != "torch" and amp_dtype is not None:
        log.info("--backend %s runs the networks in float32 (the %s autocast of --precision applies to torch only)",
                 backend, str(amp_dtype).replace("torch.", ""))
    return backend


#: Per fold: the packaged member bytes by file name (`network.onnx`, `network.xml`, `network.bin`), or None.
MemberReader = Callable[[int | str], dict[str, bytes]]


def to_backend(
    models: Sequence[nn.Module],
    backend: str,
    *,
    in_channels: int,
    patch_size: Sequence[int],
    folds: Sequence[int | str] | None = None,
    exported: MemberReader | None = None,
    source: str = "",
    threads: int | None = None,
    required: bool = True,
) -> list[nn.Module]:
    """`models` (eval-mode torch networks, one per fold) as networks of `backend` (torch: unchanged).

    exported: for a model package, a function giving a fold's exported members (`network.onnx`,
        `network.xml` + `network.bin`); BackendError naming the package (`source`) and the export
        command when the backend's member is missing. Without it (a WORK_DIR) each network is
        exported in memory from its torch weights.
    folds: the fold of each model (names them in messages); threads: default `torch.get_num_threads()`.
    required: False for `--backend auto`: a network that does not export (BackendError) keeps every
    model on torch, logged, instead of failing. Models that already are backend networks are kept.
    """
    if backend == "torch":
        return list(models)
    threads = int(threads or torch.get_num_threads())
    folds = list(folds) if folds is not None else list(range(len(models)))
    if all(isinstance(m, (OnnxRuntimeNetwork, OpenVinoNetwork)) for m in models):
        return list(models)  # converted already (a model package's exported networks)
    out: list[nn.Module] = []
    for fold, model in zip(folds, models, strict=True):
        if isinstance(model, (OnnxRuntimeNetwork, OpenVinoNetwork)):
            out.append(model)
            continue
        name = f"fold {fold}" + (f" of {source}" if source else "")
        members = exported(fold) if exported is not None else None
        if members is None:
            try:
                members = {"network.onnx": cached_export(model, in_channels, patch_size, name=name)}
            except BackendError as exc:
                if required:
                    raise
                log.info("%s; --backend auto runs torch", exc)
                return list(models)
        if backend == "openvino" and "network.xml" in members and "network.bin" in members:
            out.append(OpenVinoNetwork(members["network.xml"], members["network.bin"], threads=threads, name=name))
            continue
        if "network.onnx" not in members:
            fmt = "onnx" if backend == "onnxruntime" else "openvino"
            raise BackendError(
                f"model package {source} holds no exported network for fold {fold} (fold_{fold}/network.onnx"
                + (" or network.xml" if backend == "openvino" else "") + f"), which --backend {backend} runs; "
                f"export the package with `medseg3d export WORK_DIR -o FILE.zip --format {fmt}`, or predict with "
                "--backend torch")
        cls = OnnxRuntimeNetwork if backend == "onnxruntime" else OpenVinoNetwork
        out.append(cls(members["network.onnx"], threads=threads, name=name))
    log.info("running %d fold network(s) with %s (%d threads)", len(out), backend, threads)
    return out

