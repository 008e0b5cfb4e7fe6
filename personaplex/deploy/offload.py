"""CPU offload: temporal layers that do not fit the GPU live in (pinned) host memory and stream in.

``StreamedLayers`` replaces the temporal transformer's layer list. The offloaded layers share a few
device staging buffers (two by default): while layer k computes, the next offloaded layer is copied
from host memory into the other buffer on a side stream, and a layer's compute waits only for its own
copy. Copies and waits are ordered with CUDA events, never with host synchronisation, so a captured
CUDA graph of a whole frame contains them too and replays the same streaming each frame.

The mechanism hooks the one thing every forward pass does with the layers, iterating over them in
order: the iterator makes layer k resident before handing it out, and once the caller asks for the
next layer (layer k's kernels are queued by then) it frees k's buffer for the layer after next. The
model code is unchanged; the state dict of offloaded layers is not meaningful once streamed (their
parameters are the shared staging buffers).

Every frame streams all offloaded weights again, so the frame time is at least
``streamed bytes / host-to-device bandwidth`` (see ``personaplex.deploy.estimates``): the offloaded
layers are the *last* ones, so that the first copies overlap the resident layers' compute.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .quantize import is_quantized, tensor_bytes, tensor_parts


def rebuild(template: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A tensor like ``template`` (plain or quantized) made of ``parts`` (see ``tensor_parts``)."""
    if not is_quantized(template):
        return parts[""]
    _, context = template.__tensor_flatten__()
    return type(template).__tensor_unflatten__(parts, context, template.size(), template.stride())


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor | nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(owner, leaf, tensor)


def move_to_host_(module: nn.Module, pin: bool) -> None:
    """Move every parameter of ``module`` to host memory (page-locked with ``pin``, for async copies)."""
    with torch.inference_mode():
        for name, param in list(module.named_parameters()):
            parts = {}
            for key, part in tensor_parts(param).items():
                host = part.to("cpu")
                parts[key] = host.pin_memory() if pin else host
            _set_parameter(module, name, rebuild(param, parts))


def offloaded_indices(num_layers: int, count: int) -> list[int]:
    """The layers to offload: the last ``count`` (their first copies overlap the resident layers)."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"can offload 0..{num_layers} layers, not {count}")
    return list(range(num_layers - count, num_layers))


class StreamedLayers(nn.ModuleList):
    """Transformer layers of which ``offloaded`` (indices) are in host memory and stream to ``device``.

    The offloaded layers' parameters must already be in host memory (``move_to_host_``, pinned on
    CUDA); the others on ``device``. On a CPU device the same schedule runs with synchronous copies
    (the path tests use to check that streaming changes no output).
    """

    def __init__(self, layers: nn.ModuleList, offloaded: list[int], device: torch.device | str, buffers: int = 2):
        super().__init__(list(layers))
        self.device = torch.device(device)
        self.offloaded = sorted(offloaded)
        self._order = {layer: k for k, layer in enumerate(self.offloaded)}
        self.buffers = max(1, min(buffers, len(self.offloaded)))
        self._host: list[list[torch.Tensor]] = []  # per offloaded layer: its parts, in a fixed order
        self._staging: list[list[torch.Tensor]] = []  # per buffer: device parts, same order
        if not self.offloaded:
            return
        with torch.inference_mode():
            for index in self.offloaded:
                layer = self[index]
                self._host.append([part for _, p in layer.named_parameters() for part in tensor_parts(p).values()])
            template = self[self.offloaded[0]]
            for buffer in range(self.buffers):
                staged: dict[str, nn.Parameter] = {}
                parts = []
                for name, param in template.named_parameters():
                    device_parts = {key: torch.empty_like(part, device=self.device) for key, part in tensor_parts(param).items()}
                    staged[name] = nn.Parameter(rebuild(param, device_parts), requires_grad=False)
                    # Copy into the parts the parameter actually holds (wrapping may have made views).
                    parts += list(tensor_parts(staged[name]).values())
                self._staging.append(parts)
                for k in range(buffer, len(self.offloaded), self.buffers):
                    for name, param in staged.items():
                        _set_parameter(self[self.offloaded[k]], name, param)
        for host, staging in zip(self._host, self._staging * len(self._host)):
            if [tuple(t.shape) for t in host] != [tuple(t.shape) for t in staging]:
                raise ValueError("offloaded layers must all have the same parameter shapes")
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._loaded = [torch.cuda.Event() for _ in self.offloaded] if self._cuda else []
        self._freed = [torch.cuda.Event() for _ in range(self.buffers)] if self._cuda else []

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied from host memory per forward pass (every offloaded layer once)."""
        return sum(t.numel() * t.element_size() for host in self._host for t in host)

    @property
    def resident_layer_bytes(self) -> int:
        return sum(tensor_bytes(p) for i, layer in enumerate(self) if i not in self._order for p in layer.parameters())

    def _copy_in(self, k: int) -> None:
        """Queue the copy of offloaded layer ``k`` into its buffer, after the buffer's last reader."""
        buffer = k % self.buffers
        with torch.inference_mode():
            if not self._cuda:
                for target, source in zip(self._staging[buffer], self._host[k]):
                    target.copy_(source)
                return
            self._copy_stream.wait_event(self._freed[buffer])
            with torch.cuda.stream(self._copy_stream):
                for target, source in zip(self._staging[buffer], self._host[k]):
                    target.copy_(source, non_blocking=True)
                self._loaded[k].record(self._copy_stream)

    def __iter__(self) -> Iterator[nn.Module]:
        layers = list(self._modules.values())
        if not self.offloaded:
            yield from layers
            return
        if self._cuda:
            # Everything queued so far (e.g. the previous pass's readers of the buffers) comes first.
            for event in self._freed:
                event.record(torch.cuda.current_stream(self.device))
        for k in range(self.buffers):
            self._copy_in(k)
        for index, layer in enumerate(layers):
            k = self._order.get(index)
            if k is not None and self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._loaded[k])
            yield layer
            # The caller asked for the next layer: layer ``index``'s kernels are queued.
            if k is not None and k + self.buffers < len(self.offloaded):
                if self._cuda:
                    self._freed[k % self.buffers].record(torch.cuda.current_stream(self.device))
                self._copy_in(k + self.buffers)


def enable_offload(model, offloaded: list[int], device: torch.device | str, buffers: int = 2) -> StreamedLayers:
    """Stream the temporal layers ``offloaded`` of an LM whose other weights are on ``device``.

    Those layers' parameters are moved to host memory here when they are not there yet."""
    device = torch.device(device)
    layers = model.transformer.layers
    for index in offloaded:
        if any(part.device.type != "cpu" or (device.type == "cuda" and not part.is_pinned())
               for p in layers[index].parameters() for part in tensor_parts(p).values()):
            move_to_host_(layers[index], pin=device.type == "cuda")
    streamed = StreamedLayers(layers, offloaded, device, buffers)
    model.transformer.layers = streamed
    return streamed
