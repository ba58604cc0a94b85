"""The project's C++ CPU kernels: built once with torch's extension builder, then loaded as a module.

``paged_decode_attention_`` (``workers/csrc/paged_decode_attention.cpp``) attends one query per
sequence straight from the paged KV cache; ``routed_experts``
(``workers/csrc/routed_experts.cpp``) runs a MoE layer's routed pairs through their experts in
one call; ``rms_norm`` and ``add_rms_norm`` (``workers/csrc/rms_norm.cpp``) are RMSNorm in one
call; ``moe_route`` (``workers/csrc/moe_route.cpp``) is the MoE gate after its matmul; ``rope``
(``workers/csrc/rope.cpp``) the partial rotary embedding; ``plan_dispatch`` and
``combine_replies`` (``workers/csrc/plan_dispatch.cpp``, ``combine_replies.cpp``) the router's
dispatcher's grouping of pairs by expert worker and its per-token sum of their replies. Each is
registered as a torch op (``torch.ops.moecluster.*``) and bound in one extension module
(``workers/csrc/bindings.cpp``), with the dispatch round trip's message builder and readers
(``dispatch_messages``, ``decode_dispatch`` and ``decode_result``,
``workers/csrc/wire_codec.cpp``), which take and return Python objects and so are bound only.
The functions here call the module: a torch op call costs about 10 µs of dispatch, a bound call
1-2 µs, and a decode step makes a few dozen. The build needs a C++ compiler and ninja; it runs
once per machine (``make install`` does it, about 2 minutes on 2 cores) into ``BUILD_DIR``
(``build/cpu_kernels`` in a checkout) and is reused from there while the sources are unchanged.
Where it cannot be built, ``available()`` is False, a warning says why, and the callers fall
back to their torch (or numpy) paths. ``MOECLUSTER_CPU_KERNELS=0`` turns the kernels off (to
compare, or to rule them out).

    .venv/bin/python -m workers.cpu_kernels      # build (or find) and load them; prints the outcome
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

from router.dispatcher import DispatchKernels
from router.wire import DecodeDispatch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
BUILD_DIR_ENV = "MOECLUSTER_KERNEL_BUILD_DIR"


def _build_dir() -> Path:
    """``$MOECLUSTER_KERNEL_BUILD_DIR``; else ``build/cpu_kernels`` of a source checkout (``make
    install``); else, for an installed wheel, ``~/.cache/moecluster/cpu_kernels``."""
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists():
        return checkout / "build" / "cpu_kernels"
    return Path.home() / ".cache" / "moecluster" / "cpu_kernels"


BUILD_DIR = _build_dir()
LIBRARY_NAME = "moecluster_cpu_kernels"
SOURCES = ("paged_decode_attention.cpp", "routed_experts.cpp", "rms_norm.cpp", "moe_route.cpp", "rope.cpp",
           "combine_replies.cpp", "plan_dispatch.cpp", "wire_codec.cpp", "bindings.cpp")
HEADERS = ("float8.h", "kernels.h", "wire_codec.h")
DISABLE_ENV = "MOECLUSTER_CPU_KERNELS"
CXX_FLAGS = ("-O3", "-march=native")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call if needed)."""
    if "loaded" not in _state:
        with _lock:
            if "loaded" not in _state:
                _state["loaded"] = _load()
    return bool(_state["loaded"])


def _kernels() -> Any:
    """The loaded extension module (its functions are the kernels, called without torch's op dispatch)."""
    return _state["module"]


def load_error() -> str | None:
    """Why the kernels are not available (None when they are, or before the first ``available()``)."""
    return _state.get("error")  # type: ignore[return-value]


def _load() -> bool:
    if disabled_by_env():
        _state["error"] = f"turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return False
    try:
        library = BUILD_DIR / f"{LIBRARY_NAME}.so"
        stamp = BUILD_DIR / "built-from.sha256"
        fingerprint = _fingerprint()
        if library.exists() and stamp.exists() and stamp.read_text() == fingerprint:
            # Built from these sources: load it directly. The builder would take a lock file and run
            # ninja in every process, and a process killed while holding that lock blocks the rest.
            spec = importlib.util.spec_from_file_location(LIBRARY_NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _state["module"] = module
            return True
        from torch.utils import cpp_extension

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        _state["module"] = cpp_extension.load(
            name=LIBRARY_NAME,
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cflags=list(CXX_FLAGS),
            build_directory=str(BUILD_DIR),
            is_python_module=True,
            verbose=False,
        )
        stamp.write_text(fingerprint)
    except Exception as exc:  # no compiler, no ninja, a failed build: run without the kernels
        _state["error"] = f"{type(exc).__name__}: {exc}".strip()
        log.warning("C++ CPU kernels unavailable, using the torch fallback: %s", _state["error"])
        return False
    return True


def _fingerprint() -> str:
    """What the built library depends on: the sources, the flags, the torch build and the CPU."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(repr((CXX_FLAGS, torch.__version__, platform.machine(), _cpu_features())).encode())
    return digest.hexdigest()


def _cpu_features() -> str:
    """The CPU's instruction-set flags (-march=native builds for them): a build directory carried
    to another CPU is rebuilt rather than loaded."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def paged_decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           rows: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float) -> None:
    """Decode attention into ``out[rows]`` (in place); q and out [T, Hq, D] (q's rows may be strided,
    out is contiguous), the caches [Hkv, slots, D] float32 or bfloat16.

    Row ``rows[i]`` of q attends to the first ``context_lens[i]`` tokens of its sequence, whose
    blocks are ``block_tables[i]``. Call only when ``available()``.
    """
    _kernels().paged_decode_attention_(out, q, k_cache, v_cache, rows, block_tables, context_lens, block_size,
                                       scale)


def routed_experts(x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor,
                   local_index: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum over pairs p of token t: w_p * SwiGLU_{e_p}(x[t])``, float32 [T, H], on the CPU.

    x [T, H] float32; pair_token and pair_expert int32 or int64 [P] (global expert ids);
    pair_weight float32 [P]; local_index int64 [num_experts]: the row of each expert in gate_up
    [E, 2I, H] and down [E, H, I], E for an expert not held. Raises IndexError for a token or
    expert id out of range and ValueError for an expert not held. Call only when ``available()``.
    """
    return _kernels().routed_experts(x, pair_token, pair_expert, pair_weight, local_index, gate_up, down)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x², -1) + eps))``; x [..., H] and weight [H] float32, contiguous, H % 8 == 0."""
    return _kernels().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, rms_norm(x + residual))`` in one call; the same conditions as ``rms_norm``."""
    return _kernels().add_rms_norm(x, residual, weight, eps)


def moe_route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] float32 → (expert ids [T, K] int64, weights [T, K] float32), as
    ``workers.moe.MoeGate`` computes them after its matmul (sigmoid, bias, group-limited top-k)."""
    return _kernels().moe_route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial NeoX RoPE of x [T, heads, D] float32 (rows may be strided) with cos/sin [T, R] → a new
    contiguous [T, heads, D]; channels from R on are copied."""
    return _kernels().rope(x, cos, sin)


def combine_replies(num_tokens: int, replies: list[torch.Tensor], rows: list[torch.Tensor | None]) -> torch.Tensor:
    """Per token, the float32 sum of the reply rows that hold it, rounded once: ``out[rows[i]] += replies[i]``.

    replies: contiguous [n_i, H] bfloat16 (H a multiple of 16) or float32 (H a multiple of 8);
    rows[i]: int64 [n_i], the token of each row of reply i (no token twice), or None for every
    token in order. Tokens no reply holds are zero. Call only when ``available()``.
    """
    return _kernels().combine_replies(num_tokens, replies, rows)


# Lanes of one combine_replies step per dtype: the hidden size must be a multiple of it.
_COMBINE_LANES = {torch.bfloat16: 16, torch.float32: 8}


def combine(num_tokens: int, replies: list[torch.Tensor], rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """``combine_replies`` where the kernel sums these replies, else None: the dispatcher's
    ``router.dispatcher.Combine`` (on None it sums them in torch). Call only when ``available()``."""
    lanes = _COMBINE_LANES.get(replies[0].dtype)
    if lanes is None or replies[0].shape[1] % lanes:
        return None
    return combine_replies(num_tokens, replies, rows)


def plan_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, table: torch.Tensor,
                  counts: torch.Tensor, num_workers: int,
                  full_batch_share: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                                    list[torch.Tensor]]:
    """The plan of one MoE layer's dispatch, which ``dispatch_messages`` (the dispatcher's
    ``router.dispatcher.Messages``) frames: (workers, xs, pairs, rows), per destination worker
    (ascending, only those with pairs) the rows of x it needs gathered and their tokens (int64), or
    two empty tensors when it gets x as it is (``full_batch_share``), and its pairs as one [3, P]
    int32 tensor (row, expert id, weight bits) in token-major order. Raises IndexError for an
    expert id outside ``table``. Call only when ``available()``."""
    return _kernels().plan_dispatch(x, topk_ids, topk_weights, table, counts, num_workers, full_batch_share)


def dispatch_kernels() -> DispatchKernels | None:
    """The dispatcher's C++ message builder (``plan_dispatch`` and the frames of its plan), combine
    and result reader, or None (numpy, torch and ``router.wire`` then) where the kernels are not loaded."""
    if not available():
        return None
    return DispatchKernels(messages=_kernels().dispatch_messages, combine=combine,
                           decode_result=_kernels().decode_result)


def decode_dispatch() -> DecodeDispatch | None:
    """The expert server's C++ dispatch reader (``router.wire.DecodeDispatch``), or None where the
    kernels are not loaded."""
    return _kernels().decode_dispatch if available() else None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if available():
        print(f"C++ CPU kernels loaded from {BUILD_DIR}")
    else:
        print(f"C++ CPU kernels not available ({load_error()}); attention uses the torch fallback")


if __name__ == "__main__":
    main()
