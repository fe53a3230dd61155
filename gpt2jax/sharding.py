"""Device meshes and the tensor-parallel layout: which device holds which part of the weights and KV cache.

A mesh has two axes. "data" splits batch rows (the serving engine's decode slots; the Sampler's batch);
"model" splits the weights Megatron-style, so that a model too big for one device fits on several:

    attn/c_attn  w [E, 3E] columns, b [3E]   split by heads (each device: whole heads of q, k and v)
    attn/c_proj  w [E, E]  rows               (its input is the heads' outputs) -> one all-reduce
    mlp/c_fc     w [E, 4E] columns, b [4E]
    mlp/c_proj   w [4E, E] rows               -> one all-reduce
    wte, wpe, LayerNorms, output biases       replicated (5% of 1558M's weights)

The KV cache [B, n_head, S, head_dim] is split on its head axis over "model" and on its rows over "data".
Nothing here changes the math: XLA's SPMD partitioner (GSPMD) splits the jitted model along the params'
and cache's shardings and inserts the two all-reduces per layer. The one thing the layout must arrange is
c_attn: its 3E columns are [q | k | v], and a contiguous split of them would give a device some of q's
heads and none of v's. `Layout.shard_params` stores them permuted into `model` blocks of [q | k | v] of
consecutive heads (see gpt2jax.model.Attention's `qkv_groups`), so device d's block is exactly its heads.
When the model axis does not divide n_head (1558M has 25 heads), zero heads pad the attention to a
multiple of it: they change no output (their values and c_proj rows are zero) and cost their compute.

    mesh = make_mesh("data:4,model:2")      # 8 devices; MESH in the server's settings
    layout = Layout(mesh)
    layout.check(config, slots=16)          # clear errors for shapes that do not split
    params = layout.shard_params(params, config)   # host (or device) params -> each device its part
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2jax.model import padded_heads

DATA, MODEL = "data", "model"
log = logging.getLogger("gpt2jax.sharding")

# Params split over "model", by their path's last three names: the spec of w and of b.
_COLUMNS = (P(None, MODEL), P(MODEL))  # output features split
_ROWS = (P(MODEL, None), P())  # input features split; the bias is added once, after the all-reduce
_SPLIT = {
    ("attn", "c_attn"): _COLUMNS,
    ("attn", "c_proj"): _ROWS,
    ("mlp", "c_fc"): _COLUMNS,
    ("mlp", "c_proj"): _ROWS,
}


class ShardingError(ValueError):
    """A mesh that does not fit the devices, or a model or slot count that does not split over it."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices along each mesh axis; data 0 means every device not on the model axis."""

    data: int = 0
    model: int = 1

    @classmethod
    def parse(cls, text: str | None) -> MeshShape:
        """From "data:4,model:2" (either part may be left out; empty: all devices on data, model 1)."""
        sizes: dict[str, int] = {}
        for part in (text or "").replace(" ", "").split(","):
            if not part:
                continue
            name, sep, value = part.partition(":")
            if not sep or name not in (DATA, MODEL) or not value.isdigit() or int(value) < 1 or name in sizes:
                raise ShardingError(
                    f"mesh {text!r}: expected e.g. 'data:4,model:2' (axes data and model, sizes >= 1)"
                )
            sizes[name] = int(value)
        return cls(**sizes)

    def resolve(self, n_devices: int) -> tuple[int, int]:
        """(data, model) for `n_devices` devices; a ShardingError if they do not multiply to it."""
        data = self.data or n_devices // self.model
        if data < 1 or data * self.model != n_devices:
            raise ShardingError(
                f"a mesh of data {self.data or '(rest)'} x model {self.model} does not match the "
                f"{n_devices} devices"
            )
        return data, self.model


def make_mesh(shape: MeshShape | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: every device of every process).

    Axes are of the Auto type (GSPMD decides what it can), the model axis innermost: on TPU
    `mesh_utils.create_device_mesh` puts its devices on neighbouring chips, where its all-reduces are.
    """
    if not isinstance(shape, MeshShape):
        shape = MeshShape.parse(shape)
    default = devices is None
    devices = list(jax.devices() if default else devices)
    dims = shape.resolve(len(devices))
    grid = None
    if default and devices[0].platform != "cpu":
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(dims, devices)
        except Exception:  # an unusual topology: the plain order below still works
            grid = None
    if grid is None:
        grid = np.array(devices).reshape(dims)
    return Mesh(grid, (DATA, MODEL))


def serving_mesh(shape: MeshShape | str | None) -> Mesh | None:
    """The mesh a served model is loaded onto: `shape` (the server's MESH) over every device of every
    process. None when `shape` is empty in a single process: the model goes to one device and its engine
    spreads the decode slots over all of them."""
    if not shape and jax.process_count() == 1:
        return None
    return make_mesh(shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a model's params, KV cache and batch rows live on a ("data", "model") mesh."""

    mesh: Mesh

    @property
    def data(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def model(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def qkv_groups(self) -> int:
        """c_attn's column blocks in the placed params (pass to gpt2jax.model.forward)."""
        return self.model

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def rows(self) -> NamedSharding:
        """Arrays with a leading batch (slot) axis split over "data"."""
        return NamedSharding(self.mesh, P(DATA))

    def cache_sharding(self, split_rows: bool = True) -> NamedSharding:
        """A KV cache leaf [B, n_head, S, head_dim]: heads over "model", rows over "data" if split_rows."""
        return NamedSharding(self.mesh, P(DATA if split_rows else None, MODEL))

    def check(self, config: Any, slots: int | None = None) -> None:
        """Raises ShardingError, saying what to change, if the model (or `slots`) does not split."""
        check_split(config, self.data, self.model, slots)

    # ---- params ----

    def param_specs(self, params: Any) -> Any:
        return param_specs(params)

    def param_shardings(self, params: Any) -> Any:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params))

    def shard_params(self, params: Any, config: Any, dtype: Any = None) -> Any:
        """Checkpoint-layout params (numpy or jax arrays) placed on the mesh, attention grouped by device.

        Each device receives only its own part (built by `jax.make_array_from_callback`), so a model
        bigger than one device is never gathered on one; with several processes, each places the parts
        of its own devices (every process passes the same params). dtype: cast on the host first.
        """
        params = group_heads(params, config.n_head, self.model)
        shardings = self.param_shardings(params)

        def place(leaf: Any, sharding: NamedSharding) -> jax.Array:
            if isinstance(leaf, jax.Array) and dtype is None and leaf.is_fully_addressable:
                return jax.device_put(leaf, sharding)
            host = np.asarray(leaf, dtype=dtype)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(place, params, shardings)

    def unshard_params(self, params: Any, config: Any) -> Any:
        """Placed params back to the checkpoint layout, as host numpy arrays (for saving, comparing)."""
        return group_heads(jax.tree.map(np.asarray, params), config.n_head, self.model, inverse=True)

    # ---- memory ----

    def bytes_per_device(self, params: Any) -> dict[jax.Device, int]:
        """Bytes of placed `params` each addressable device holds (from the arrays' own shards)."""
        held: dict[jax.Device, int] = {}
        for leaf in jax.tree.leaves(params):
            for shard in leaf.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        return held


def check_split(config: Any, data: int, model: int, slots: int | None = None) -> None:
    """Raises ShardingError, saying what to change, if the model (or `slots`) does not split over the mesh.

    n_head need not be a multiple of the model axis: the attention is then padded with zero heads (see
    gpt2jax.model.Attention), e.g. 1558M's 25 heads to 28 over 4 devices (12% more attention work).
    """
    if (4 * config.n_embd) % model:
        raise ShardingError(
            f"the model axis ({model}) must divide the MLP width 4*n_embd ({4 * config.n_embd}): choose a "
            "model axis size that does"
        )
    if slots is not None and slots % data:
        raise ShardingError(f"slots ({slots}) must be a multiple of the data axis ({data})")
    if config.n_head % model:
        log.warning(
            "n_head %d does not split over a model axis of %d: padded with %d zero heads",
            config.n_head,
            model,
            padded_heads(config.n_head, model) - config.n_head,
        )


def param_specs(params: Any) -> Any:
    """A PartitionSpec per param leaf (see the module docstring); works on shapes as well as arrays."""

    def spec(path: tuple[Any, ...], leaf: Any) -> P:
        names = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        split = _SPLIT.get(tuple(names[-3:-1]))
        return P() if split is None else split[0 if names[-1] == "w" else 1]

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_shape(shape: tuple[int, ...], spec: P, axis_sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of one device's part of an array of `shape` split by `spec` over axes of these sizes."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(n // (axis_sizes[a] if a else 1) for n, a in zip(shape, spec, strict=True))


def param_bytes_per_device(config: Any, model: int, itemsize: int = 4) -> int:
    """What one device holds of a model's weights when the model axis has `model` devices.

    Computed from the shapes, as Layout.param_specs splits them: the four big matrices of each layer and
    the column biases are divided by `model` (the attention's padded to whole heads per device);
    embeddings, LayerNorms and output biases are whole.
    """
    e, layers = config.n_embd, config.n_layer
    a = padded_heads(config.n_head, model) * config.head_dim  # attention width
    split = layers * (e * 3 * a + 3 * a + a * e + e * 4 * e + 4 * e + 4 * e * e)
    whole = config.n_vocab * e + config.n_ctx * e + layers * (4 * e + 2 * e) + 2 * e
    return (split // model + whole) * itemsize


def group_heads(params: Any, n_head: int, groups: int, inverse: bool = False) -> Any:
    """The attention's params from GPT-2's layout to `groups` groups of whole heads (or back).

    c_attn's columns [q | k | v] (each n_head heads of D) become G blocks [q | k | v] of H/G consecutive
    heads, H = n_head rounded up to a multiple of G (gpt2jax.model.padded_heads): a contiguous split of
    the columns into G parts then gives each part whole heads of q, k and v. Heads beyond n_head get zero
    columns in c_attn and zero rows in c_proj. groups 1 is the identity. Host-side numpy.
    """
    if groups == 1:
        return params
    H, Hp = n_head, padded_heads(n_head, groups)

    def attention(c_attn: Any, c_proj: Any) -> tuple[dict, dict]:
        w = np.asarray(c_attn["w"])
        D = w.shape[1] // (3 * (Hp if inverse else H))

        def regroup(a: np.ndarray) -> np.ndarray:
            a, lead = np.asarray(a), a.shape[:-1]
            if inverse:  # (.., G, 3, Hp/G, D) -> (.., 3, Hp, D) -> drop the padding heads
                a = np.moveaxis(a.reshape(*lead, groups, 3, Hp // groups, D), -3, -4)
                return a.reshape(*lead, 3, Hp, D)[..., :H, :].reshape(*lead, 3 * H * D)
            a = a.reshape(*lead, 3, H, D)
            a = np.concatenate([a, np.zeros((*lead, 3, Hp - H, D), a.dtype)], axis=-2)
            a = np.moveaxis(a.reshape(*lead, 3, groups, Hp // groups, D), -4, -3)  # (.., G, 3, Hp/G, D)
            return a.reshape(*lead, 3 * Hp * D)

        rows = np.asarray(c_proj["w"])  # [heads * D, E]
        if inverse:
            rows = rows[: H * D]
        else:
            rows = np.concatenate([rows, np.zeros(((Hp - H) * D, rows.shape[1]), rows.dtype)])
        return {**c_attn, "w": regroup(w), "b": regroup(c_attn["b"])}, {**c_proj, "w": rows}

    def walk(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        if "c_attn" in out and "c_proj" in out:  # a layer's attn
            out["c_attn"], out["c_proj"] = attention(out["c_attn"], out["c_proj"])
        return out

    return walk(params)


def mesh_summary(mesh: Mesh) -> str:
    """E.g. "data 4 x model 2 over 8 cpu devices (2 processes)"."""
    devices = list(mesh.devices.flat)
    processes = len({d.process_index for d in devices})
    return (
        f"data {mesh.shape[DATA]} x model {mesh.shape[MODEL]} over {len(devices)} {devices[0].platform} devices"
        + (f" ({processes} processes)" if processes > 1 else "")
    )
