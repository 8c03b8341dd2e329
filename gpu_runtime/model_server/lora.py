"""Many LoRA adapters over one frozen base model, routed per batch row.

Each targeted `nn.Linear` of the base is wrapped once (`MultiLoraLinear`); the adapters' A/B matrices live in
`LoraAdapter` objects outside the module tree, so adding, evicting or reloading an adapter never touches the
model. Before a forward the caller sets the routing (`Router.use`): which adapter serves which rows. Inside
the one forward pass each wrapped layer adds, per adapter present, `scale * B A x` to that adapter's rows,
so a batch mixing several tenants' adapters is one forward and one backward, and each adapter's gradient
comes only from its own rows. When each adapter's rows are one contiguous run (the engine's batches), the
updates are computed on views and joined by one cat and one add per layer; otherwise rows are gathered by
index.

The update is PEFT's LoRA (Hu et al. 2021): W x + (alpha / r) B A x, A kaiming-uniform, B zero, so a saved
adapter loads into `peft` unchanged (`adapter_io`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpu_runtime.model_server.types import LoraConfig, ModelServerError

LORA_ALPHA = 32.0  # Tinker names no alpha; PEFT's scale alpha / r with a fixed alpha, as SkyRL does
MAX_RANK = 512
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


def module_kinds(config: LoraConfig) -> tuple[str, ...]:
    kinds: tuple[str, ...] = ()
    if config.train_attn:
        kinds += ATTN_MODULES
    if config.train_mlp:
        kinds += MLP_MODULES
    if config.train_unembed:
        kinds += UNEMBED_MODULES
    return kinds


@dataclass
class LoraPair:
    a: nn.Parameter  # [r, in]
    b: nn.Parameter  # [out, r]


class LoraAdapter:
    """One client's adapter: A/B per targeted module (fp32, whatever the base's dtype), its AdamW state and,
    between `forward_backward` and `optim_step`, its accumulated gradients (the parameters' .grad)."""

    def __init__(self, config: LoraConfig, pairs: dict[str, LoraPair], *, alpha: float = LORA_ALPHA) -> None:
        self.config = config
        self.pairs = pairs
        self.alpha = alpha
        self.scale = alpha / config.rank
        # lr and betas are set from each call's AdamParams before stepping
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=0.0, eps=1e-12, weight_decay=0.0)
        self.steps = 0

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """PEFT's key names (what `get_peft_model_state_dict` writes), in a fixed order."""
        out: dict[str, nn.Parameter] = {}
        for name in sorted(self.pairs):
            out[f"base_model.model.{name}.lora_A.weight"] = self.pairs[name].a
            out[f"base_model.model.{name}.lora_B.weight"] = self.pairs[name].b
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_parameters().values())

    def has_grad(self) -> bool:
        return any(p.grad is not None for p in self.parameters())

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        pair = self.pairs.get(name)
        if pair is None:
            return None
        h = x.to(pair.a.dtype) @ pair.a.t()
        return ((h @ pair.b.t()) * self.scale).to(x.dtype)


# (adapter, its rows: None = every row, a slice = a contiguous run, a tensor = row indices)
Route = list[tuple[LoraAdapter, slice | Tensor | None]]


class Router:
    """Which adapter serves which rows of the batch in the forward pass under way (empty: the base)."""

    def __init__(self) -> None:
        self.active: Route = []

    @contextmanager
    def use(self, route: Route) -> Iterator[None]:
        previous, self.active = self.active, route
        try:
            yield
        finally:
            self.active = previous


def route_rows(adapters: Sequence[LoraAdapter | None], device: torch.device) -> Route:
    """Group the rows of a batch by adapter (None = the base alone for that row)."""
    rows: dict[int, tuple[LoraAdapter, list[int]]] = {}
    for i, adapter in enumerate(adapters):
        if adapter is not None:
            rows.setdefault(id(adapter), (adapter, []))[1].append(i)
    if len(rows) == 1 and len(next(iter(rows.values()))[1]) == len(adapters):
        return [(next(iter(rows.values()))[0], None)]  # one adapter for the whole batch: no gather
    if all(r[-1] - r[0] + 1 == len(r) for _, r in rows.values()):  # each adapter's rows in one run (the
        # engine's batches: calls follow one another): slices of views, no gather
        return [(a, slice(r[0], r[-1] + 1)) for a, r in rows.values()]
    return [(a, torch.tensor(r, dtype=torch.long, device=device)) for a, r in rows.values()]


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus, per routed adapter, its LoRA update on that adapter's rows."""

    def __init__(self, base: nn.Linear, name: str, router: Router) -> None:
        super().__init__()
        self.base = base
        self.lora_name = name
        self.router = router

    @property
    def weight(self) -> Tensor:  # callers that read a linear's weight (tied embeddings, dtype probes)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        route = self.router.active
        if route and all(isinstance(rows, slice) for _, rows in route):
            return out + self._runs(x, out)
        for adapter, rows in route:
            if rows is None:
                d = adapter.delta(self.lora_name, x)
                if d is not None:
                    out = out + d
            elif isinstance(rows, Tensor):
                d = adapter.delta(self.lora_name, x.index_select(0, rows))
                if d is not None:
                    out = out.index_add(0, rows, d)
        return out

    def _runs(self, x: Tensor, out: Tensor) -> Tensor:
        """The updates of adapters that each hold a contiguous run of rows, as one tensor shaped like `out`
        (zeros where a row has no adapter or the adapter does not target this layer): one cat, one add."""
        pieces: list[Tensor] = []
        at = 0
        for adapter, rows in self.router.active:
            assert isinstance(rows, slice)
            if rows.start > at:
                pieces.append(out.new_zeros((rows.start - at, *out.shape[1:])))
            d = adapter.delta(self.lora_name, x[rows])
            pieces.append(d if d is not None else out.new_zeros((rows.stop - rows.start, *out.shape[1:])))
            at = rows.stop
        if at < out.shape[0]:
            pieces.append(out.new_zeros((out.shape[0] - at, *out.shape[1:])))
        return torch.cat(pieces)


class MultiLoraModel:
    """The frozen base model with every LoRA-able linear wrapped, and the router they share."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.router = Router()
        model.requires_grad_(False)
        self.linears: dict[str, nn.Linear] = {}
        kinds = ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES
        targets = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in kinds
        ]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MultiLoraLinear(linear, name, self.router))
            self.linears[name] = linear

    @property
    def device(self) -> torch.device:
        return next(iter(self.linears.values())).weight.device

    def shapes(self, config: LoraConfig) -> dict[str, tuple[int, int]]:
        """(in, out) of each module an adapter with this config targets."""
        kinds = module_kinds(config)
        return {
            name: (m.in_features, m.out_features)
            for name, m in self.linears.items()
            if name.rsplit(".", 1)[-1] in kinds
        }

    def new_adapter(self, config: LoraConfig) -> LoraAdapter:
        """A fresh adapter: A as PEFT initialises it (kaiming-uniform, a=sqrt(5)) from `config.seed`, B zero,
        so it starts as the base model."""
        if not 1 <= config.rank <= MAX_RANK:
            raise ModelServerError(f"LoRA rank must be in [1, {MAX_RANK}], got {config.rank}")
        shapes = self.shapes(config)
        if not shapes:
            raise ModelServerError("lora_config trains nothing: set train_attn, train_mlp or train_unembed")
        gen = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
        pairs: dict[str, LoraPair] = {}
        for name in sorted(shapes):
            fan_in, fan_out = shapes[name]
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5))'s bound
            a = (torch.rand((config.rank, fan_in), generator=gen) * 2 - 1) * bound
            b = torch.zeros((fan_out, config.rank))
            pairs[name] = LoraPair(nn.Parameter(a.to(self.device)), nn.Parameter(b.to(self.device)))
        return LoraAdapter(config, pairs)
