"""Loads vLLM's Triton LoRA ops (lora_shrink_op.py, lora_expand_op.py and the kernel_utils.py and
utils.py they import) from a folder outside this repository, without the vllm package.

Their files import a handful of vllm modules (triton_utils, envs, the platform, a logger and two
small helpers). This module registers stand-ins for exactly those names in sys.modules, under
both the vllm/lora/ops/triton_ops layout and the vllm/runtime/modeling/lora/ops/triton_ops one
that replaced it, then executes their four files unmodified under their own module names:

    from vllm_shim import load_vllm_lora_ops
    ops = load_vllm_lora_ops(".dev/peers/vllm")
    ops.shrink(...); ops.expand(...)   # their _lora_shrink / _lora_expand

The stand-ins give vLLM's defaults: no tuned-config folder (get_lora_op_configs returns its
built-in defaults), batch invariance off, dual-stream LoRA off (so their launches use no PDL),
and direct_register_custom_op doing nothing (their modules then fall back to the plain
functions, which is what we call anyway).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

_FILES = ("kernel_utils", "utils", "lora_shrink_op", "lora_expand_op")
_PACKAGES = ("vllm.runtime.modeling.lora.ops.triton_ops", "vllm.lora.ops.triton_ops")


def _module(name: str, **attrs) -> types.ModuleType:
    """sys.modules[name], created (with its parent packages) if missing, with attrs set."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            m = types.ModuleType(sub)
            m.__path__ = []  # a package, so that dotted imports below it resolve
            sys.modules[sub] = m
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], m)
    m = sys.modules[name]
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


class _Logger(logging.LoggerAdapter):
    def __init__(self, name: str):
        super().__init__(logging.getLogger(name), {})
        self._seen: set[str] = set()

    def _once(self, level: int, msg: str) -> None:
        if msg not in self._seen:
            self._seen.add(msg)
            self.log(level, msg)

    def warning_once(self, msg: str, *a, **k) -> None:
        self._once(logging.WARNING, msg)

    def info_once(self, msg: str, *a, **k) -> None:
        self._once(logging.INFO, msg)

    def debug_once(self, msg: str, *a, **k) -> None:
        self._once(logging.DEBUG, msg)


class _Platform:
    """current_platform: CUDA, with the device's compute capability."""

    def is_cuda(self) -> bool:
        import torch

        return torch.cuda.is_available() and torch.version.hip is None

    def is_rocm(self) -> bool:
        return False

    def has_device_capability(self, capability, device_id: int = 0) -> bool:
        import torch

        major, minor = torch.cuda.get_device_capability(device_id)
        want = capability if isinstance(capability, int) else capability[0] * 10 + capability[1]
        return major * 10 + minor >= want

    def get_device_capability(self, device_id: int = 0):
        import torch

        return torch.cuda.get_device_capability(device_id)


def _install_stubs() -> None:
    import torch
    import triton
    import triton.language as tl

    envs = _module(
        "vllm.foundation.system.envs",
        VLLM_BATCH_INVARIANT=False,
        VLLM_TUNED_CONFIG_FOLDER=None,
        VLLM_LORA_ENABLE_DUAL_STREAM=False,
        VLLM_LORA_DISABLE_PDL=False,
    )
    sys.modules["vllm.envs"] = envs
    sys.modules["vllm"].envs = envs

    def direct_register_custom_op(*args, **kwargs) -> None:
        return None

    def async_tensor_h2d(data, dtype, device, pin_memory: bool = True):
        return torch.tensor(data, dtype=dtype, pin_memory=pin_memory, device="cpu").to(device, non_blocking=True)

    def next_power_of_2(n: int) -> int:
        return 1 if n < 1 else 1 << (int(n) - 1).bit_length()

    platform = _Platform()
    for name in ("vllm.backends.compute.dsl.triton_utils", "vllm.triton_utils"):
        _module(name, tl=tl, triton=triton, HAS_TRITON=True)
    for name in ("vllm.foundation.utilities.torch_utils", "vllm.utils.torch_utils", "vllm.utils"):
        _module(name, direct_register_custom_op=direct_register_custom_op, async_tensor_h2d=async_tensor_h2d)
    for name in ("vllm.foundation.utilities.math_utils", "vllm.utils.math_utils", "vllm.utils"):
        _module(name, next_power_of_2=next_power_of_2)
    for name in ("vllm.backends.platform", "vllm.platforms"):
        _module(name, current_platform=platform)
    for name in ("vllm.foundation.observability.logger", "vllm.logger"):
        _module(name, init_logger=_Logger)


class VllmLoraOps:
    def __init__(self, shrink_mod, expand_mod, utils_mod):
        self.shrink = shrink_mod._lora_shrink
        self.expand = expand_mod._lora_expand
        self.get_lora_op_configs = utils_mod.get_lora_op_configs
        self._utils = utils_mod

    def forget_weights(self) -> None:
        """Empties their per-weight caches (keyed by data_ptr: a freed weight's address can come
        back for a weight of another shape, which vLLM, allocating once, never sees)."""
        self._utils._LORA_A_PTR_DICT.clear()
        self._utils._LORA_B_PTR_DICT.clear()


def load_vllm_lora_ops(folder: str | Path) -> VllmLoraOps:
    """Their four files from `folder`, executed under both package names."""
    folder = Path(folder)
    missing = [f"{f}.py" for f in _FILES if not (folder / f"{f}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (vLLM's vllm/lora/ops/triton_ops files)")
    _install_stubs()
    for pkg in _PACKAGES:
        _module(pkg)
    loaded = {}
    for f in _FILES:
        canonical = f"{_PACKAGES[0]}.{f}"
        spec = importlib.util.spec_from_file_location(canonical, folder / f"{f}.py")
        mod = importlib.util.module_from_spec(spec)
        for pkg in _PACKAGES:  # both layouts' imports find the same module object
            sys.modules[f"{pkg}.{f}"] = mod
            setattr(sys.modules[pkg], f, mod)
        spec.loader.exec_module(mod)
        loaded[f] = mod
    return VllmLoraOps(loaded["lora_shrink_op"], loaded["lora_expand_op"], loaded["utils"])
