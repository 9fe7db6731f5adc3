"""Where dropout's Philox seed comes from: torch's generators, as torch's own dropout.

- CUDA tensors, eager: the device's generator (``torch.cuda.default_generators[i]`` or the one
  given).  Its seed and Philox offset are host-side state: the offset is read and advanced here
  (``get_offset`` / ``set_offset``, no kernel, no sync) and mixed with the seed into the kernel's
  31-bit seed, so consecutive calls draw new masks, ``torch.manual_seed`` (which resets the
  offset) reproduces a run, and CPU random streams (data-loader shuffling) are untouched.
- CUDA tensors while a CUDA graph is being captured, and under torch.compile: a 0-dim int64
  *device* tensor drawn by ``torch.randint`` on the device's generator, which the kernel loads.
  torch's CUDA randint is graph-safe (a captured graph draws from the generator's offset at each
  replay), so every replay of a captured graph, and every run of a cudagraph-compiled model,
  draws a new mask.  A host int would be frozen into the graph: the same mask each replay.
- CPU tensors: a 0-dim int64 CPU tensor from torch's CPU generator (or ``generator``), which the
  kernel (interpreter) loads itself: no ``int(tensor)`` on the host path either.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _mix(seed: int, offset: int) -> int:
    """A 31-bit kernel seed from (generator seed, Philox offset): splitmix64's finaliser, so that
    neighbouring offsets give unrelated seeds."""
    z = (seed + 0x9E3779B97F4A7C15 * (offset + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def _default_generator(device: torch.device) -> torch.Generator:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# Philox offset consumed per call: the CUDA generator takes offsets in multiples of 4
OFFSET_STEP = 4


def draw(device: torch.device, generator: torch.Generator | None = None):
    """(seed tensor or None, seed int) for one dropout call on ``device``: the kernel takes the
    tensor (loaded on the device) when there is one, else the int."""
    gen_device = generator.device if generator is not None else None
    if device.type == "cpu" or torch.compiler.is_compiling() or _capturing(device):
        on = gen_device if gen_device is not None else device
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64, generator=generator, device=on)
        return (seed if on == device or on.type == device.type else seed.to(device)), 0
    if gen_device is not None and gen_device.type == "cpu":  # a CPU generator for device data
        return None, int(torch.randint(0, 2**31 - 1, (), generator=generator))  # CPU read
    gen = generator if generator is not None else _default_generator(device)
    offset = gen.get_offset()
    gen.set_offset(offset + OFFSET_STEP)
    return None, _mix(gen.initial_seed(), offset)
