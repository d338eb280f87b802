r"""LASP-2 sequence parallelism (Sun et al. 2025) on the ``seq`` mesh axis.

Each public function here has the signature of the op it wraps (``gla``,
``delta_rule``, ``dplr``, ``ssm_scan``, ``selective_scan``, and causal softmax
``attention`` for hybrid stacks). When the current mesh
(``jax.sharding.get_abstract_mesh()``, set by ``jax.set_mesh``) has a ``seq``
axis of size n > 1, the sequence dimension is split into n contiguous slices of
T / n tokens, one per device, and the op runs under ``jax.shard_map``;
otherwise the op is called directly, unchanged (no mesh,
or seq == 1, costs nothing). Layers call these instead of the ops, so setting
``mesh.seq > 1`` in a config shards the sequence with no change to model code.

Linear recurrences. Every op here is affine in its initial state: a slice run
from state S gives

    final state  S_out = M S + D,        output  o_t = o_t^0 + Q_t S,

where D and o^0 are the slice's final state and output from a zero start, M is
the slice's transition and Q_t S is the readout of the carried state. Per slice
(one device), per layer:

1. one local op call (any impl: chunked, Pallas, ...) from a zero start gives
   o^0 and D; the same call (or an elementwise product) gives M and Q;
2. one ``all_gather`` over ``seq`` of the packed summary (M, D): O(H K V)
   values per device, independent of T;
3. every device folds the summaries of the slices before its own, in order,
   starting from the global h0: S_i = M_{i-1} (... (M_0 h0 + D_0) ...) + D_{i-1}
   (a loop over the n summaries, which also gives the final state S_n on every
   device, replicated without moving it), and adds Q_t S_i to its outputs.

* GLA (any gated or ungated linear attention): M = diag(exp(sum_t log_g_t)) is
  packed as one extra value column beside D, [B, H, K, V + 1];
  Q_t = scale * q_t * exp(sum_{s<=t} log_g_s). One gate per head ([B, T, H])
  stays one per head: its cumulative decay is [B, t, H], scales the rows of
  the [B, t, H, V] readout q_t S, and fills the K entries of M's column.
* Delta rule (DeltaNet, Gated DeltaNet, beta in [0, 2]): the op runs once with
  the K x K identity appended to the state and zeros appended to the values,
  h0 = [I | 0], v = [0 | v]. Then the state's first K columns evolve as
  prod_t exp(g_t) (I - beta_t k_t k_t^T) (decay then delta update, exactly the
  reference order) and its last V columns as the usual zero-start state, so
  the final state is [M | D], [B, H, K, K + V], already packed, and the first K
  output columns are Q_t = scale * q_t^T M_t.
* DPLR (KDA, RWKV-7, DeltaProduct, gdn2: transitions diag(exp g_t) +
  b_t a_t^T): the delta rule's augmentation unchanged. The rank-one input
  u_t v_t^T writes zeros into the identity columns, so they evolve as the
  product of the transitions alone: the final state is [M | D] and the first
  K output columns are Q_t, from the op's one call with K extra value columns.
* Diagonal SSM scans: M = prod_t a_t (an associative-scan cumulative product,
  no logs, so signed and zero decays are exact; recomputed in the backward
  pass, see ``_cumprod``), stacked with D as [2, B, ...];
  Q_t = prod_{s<=t} a_s elementwise.
* Selective scan (Mamba): M = prod_t a_t with a_t = exp(dt_t A) (or its signed
  form) and D, stacked as [2, B, E, N], both from ONE op call on a doubled state,
  [A | A], B' = [B | 0], C' = 0 and h0 = [0 | 1] (the second half is the decay
  product, exact for zero and signed decays). Here the outputs are not
  corrected by Q_t S, which would be the [B, t, E, N] decay products this op
  exists not to write: the op runs a second time from the gathered state S_i
  and gives the outputs directly. Two op calls, the first with 2N state
  entries, and still O(E N) communication.

This runs the local op once, not twice: adding Q_t S_i to the zero-start output
is the same function as rerunning the op from S_i (the recurrences are affine in
the state), at the cost of one [T, K] x [K, V] product (or an elementwise one).
The delta rule pays for it with K extra value columns in its one op call.

Softmax attention (LASP-2H): keys and values are stacked and all-gathered over
``seq`` in one collective (O(T), as for any sequence-parallel softmax
attention); each device's query slice attends with a causal (and optional
sliding-window) mask in global positions, offset axis_index * T / n.

Backward. Autodiff through ``shard_map``, no custom VJP: the transpose of the
summary ``all_gather`` is a ``psum_scatter`` (reduce-scatter) of the summary
gradients, the same O(H K V) bytes in reverse, and everything else is local.
Measured in the compiled HLO of one layer's forward + backward on an 8-device
CPU mesh (seq=8; tests/parallel/seq_check.py asserts it, for GLA, the delta rule
and the SSM scan): exactly one all-gather and one reduce-scatter, no other
collective, with byte sizes equal at T = 1024 and T = 4096. Attention: one
all-gather of K and V forward, one reduce-scatter of their gradients backward.
With a given h0 whose gradient is needed, its gradient is summed over ``seq``
(one more all-reduce of O(H K V)); training starts from zeros and has none. In
a whole train step of a (Gated DeltaNet, attention) LM on (data=2, seq=4) the
mixers add one all-gather and one reduce-scatter each (seq_check.py asserts
the counts); the rest is XLA's: parameter-gradient all-reduces, collective-
permutes of the short convolutions' 3-token halos, and all-to-alls that
reshard the short convolution's input (see the note in BENCHMARKS.md).

Layout. The shard_map is manual over every mesh axis: the batch dimension is
split over ``data`` and ``fsdp`` (the default rules' batch axes) and heads over
``tensor`` where those sizes divide the dims, and replicated otherwise; XLA
reshards at the boundary if the activations arrive laid out otherwise. Outside
the op call (projections, short convolutions with their one-token halo, norms)
XLA's auto-sharding is in charge. LSSL / S4D layers in "conv" mode run their
recurrent form when seq > 1 (lsm/layers/ssm.py): an FFT over a sharded T would
gather the whole sequence.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lsm.ops.common import segments as _segments
from lsm.ops.delta_rule import delta_rule as _delta_rule_op
from lsm.ops.dplr import dplr as _dplr_op
from lsm.ops.gla import gla as _gla_op
from lsm.ops.selective_scan import selective_scan as _selective_scan_op
from lsm.ops.ssm_scan import ssm_scan as _ssm_scan_op

SEQ_AXIS = "seq"
# Mesh axes of the activations' batch and head dims (the default rules in
# lsm.parallel.rules map batch -> (data, fsdp) and heads -> tensor).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def _mesh():
  """The current abstract mesh, or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def seq_size(axis: str = SEQ_AXIS) -> int:
  """Size of the sequence-parallel mesh axis in the current mesh (1 when there
  is no mesh, no such axis, or the axis is already manual, i.e. the caller is
  inside its own shard_map over it and owns the split)."""
  mesh = _mesh()
  if mesh is None or axis not in mesh.axis_names:
    return 1
  if mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Manual:
    return 1
  return int(mesh.shape[axis])


def _check_length(op: str, T: int, n: int, axis: str) -> None:
  if T % n:
    raise ValueError(
        f"{op}: sequence length T={T} is not divisible by the mesh's {axis!r} axis "
        f"of size {n}; expected T to be a multiple of {n} (each device holds T / "
        f"{n} contiguous tokens)")


def _axes_for(mesh, names, dim: int):
  """The mesh axes among ``names`` that split ``dim``, as a spec entry: each in
  turn while the product still divides ``dim``. Axes of size 1 are always named:
  shard_map's transpose sums a cotangent over every axis a spec leaves out, and
  even over a size-1 axis that is a (no-op) all-reduce in the HLO."""
  use, size = [], 1
  for a in names:
    if a in mesh.axis_names and dim % (size * mesh.shape[a]) == 0:
      use.append(a)
      size *= mesh.shape[a]
  if not use:
    return None
  return tuple(use) if len(use) > 1 else use[0]


def _layout(mesh, batch: int, heads: int):
  """(batch spec entry, head spec entry) for the manual shard_map."""
  return _axes_for(mesh, BATCH_AXES, batch), _axes_for(mesh, (HEAD_AXIS,), heads)


def _fold(summary, h0, apply, axis, like):
  """The layer's one collective, then the fold of the slices' summaries.

  Args:
    summary: this slice's packed summary.
    h0: the state before slice 0, or None for zeros shaped like ``like``.
    apply: (summary, state) -> the state after that summary's slice.
    axis: the sequence mesh axis.
    like: an array of the state's shape.

  Returns:
    (the state entering this device's slice, the state after the last slice).
    Every device computes the second identically from the gathered summaries,
    so it is returned replicated over ``axis`` without moving it.
  """
  gathered = jax.lax.all_gather(summary, axis)  # [n, ...], slice order
  states = [jnp.zeros(like.shape, jnp.float32) if h0 is None else h0]
  for j in range(gathered.shape[0]):
    states.append(apply(gathered[j], states[-1]))
  h_in = jax.lax.dynamic_index_in_dim(jnp.stack(states[:-1]),
                                      jax.lax.axis_index(axis), 0, keepdims=False)
  return h_in, states[-1]


def _with_resets(segment_ids):
  """(segment_ids, their reset flags over the whole row), or (None, None).
  The flags are taken before the split: whether a slice's first token starts a
  document depends on the previous slice's last id."""
  if segment_ids is None:
    return None, None
  return segment_ids, _segments.resets(segment_ids)


def _shard_map(body, mesh, in_specs, out_specs):
  # check_vma=False: the ops are written for any caller and start their scans
  # from constants (zero states, identity matrices) that shard_map's type check
  # would reject as carries that turn varying. Without the check, shard_map's
  # transpose sums the cotangent of an input over the axes its spec leaves out
  # (h0 over seq: its gradient is the sum of every slice's share) and divides
  # an output's cotangent by their sizes (h_T, computed identically on every
  # slice: each takes 1/n of its cotangent, and the summaries' reduce-scatter
  # adds the n shares back up).
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _run(body, mesh, arrays, specs, out_specs):
  """``body(*arrays)`` under shard_map; None entries of ``arrays`` are not
  arguments of the shard_map and reach ``body`` as None."""
  idx = [i for i, x in enumerate(arrays) if x is not None]

  def wrapped(*xs):
    full = [None] * len(arrays)
    for i, x in zip(idx, xs):
      full[i] = x
    return body(*full)

  return _shard_map(wrapped, mesh, tuple(specs[i] for i in idx), out_specs)(
      *(arrays[i] for i in idx))


# -- GLA ----------------------------------------------------------------------


def _reach(resets):
  """bool [B, t]: no document starts in the slice up to and including t, so
  the state entering the slice reaches t (M and Q are zero from the first
  reset on); None without documents."""
  if resets is None:
    return None
  return jnp.cumsum(resets.astype(jnp.int32), axis=1) == 0


def _gla_gates(log_g):
  """[B, t, H] or [B, t, H, K] log gates -> float32 of the same shape: one gate
  per head stays one per head (the op reads it so; no [B, t, H, K] copy)."""
  return log_g.astype(jnp.float32)


def gla_slice(q, k, v, log_g, h0, segment_ids=None, resets=None, *, call,
              scale: float, axis: str):
  """One device's part of sequence-parallel GLA, inside shard_map (or a vmap
  with ``axis_name=axis``, which tests use to check it on one device).

  Args:
    q, k, v, log_g: this slice of the op's inputs, [B, t, H, *].
    h0: [B, H, K, V] float32 state before the first slice, or None for zeros.
    segment_ids, resets: this slice of the row's document ids and of their
      global reset flags (``segments.resets`` of the whole row: the slice's
      first token may start a document), [B, t]; or None.
    call: the op, ``call(q, k, v, log_g, h0=..., segment_ids=...) -> (o, h_t)``.
    scale: the query scale the op applies.
    axis: the sequence axis name.

  Returns:
    o: [B, t, H, V] in q.dtype; h_T: [B, H, K, V] float32 after the last slice.
  """
  V = v.shape[-1]
  # zero start: [B, t, H, V], [B, H, K, V]
  o0, d = call(q, k, v, log_g, h0=None, segment_ids=segment_ids)
  reach = _reach(resets)  # [B, t]: the incoming state still reaches t
  if log_g is None:  # no decay (no constant zero gates for XLA to fold)
    gate_in, decay = None, jnp.ones(d.shape[:-1], jnp.float32)
  else:
    # decay from the slice start to t: [B, t, H, K], or [B, t, H] per head
    gate_in = jnp.exp(jnp.cumsum(_gla_gates(log_g), axis=1))
    decay = gate_in[:, -1]  # the slice's total decay, [B, H, K] or [B, H]
    if decay.ndim == 2:  # per head: one value for the K rows of the summary
      decay = jnp.broadcast_to(decay[..., None], d.shape[:-1])
  if reach is not None:
    decay = jnp.where(reach[:, -1, None, None], decay, 0.0)
  summary = jnp.concatenate([d, decay[..., None]], axis=-1)  # [B, H, K, V + 1]
  apply = lambda x, h: x[..., V:] * h + x[..., :V]  # noqa: E731
  h_in, h_t = _fold(summary, h0, apply, axis, d)
  q_eff = scale * q.astype(jnp.float32)
  if gate_in is not None and gate_in.ndim == 4:
    q_eff = q_eff * gate_in
  o_in = _einsum("bthk,bhkv->bthv", q_eff, h_in)  # [B, t, H, V]
  if gate_in is not None and gate_in.ndim == 3:
    o_in = gate_in[..., None] * o_in  # per head: scales rows of the readout
  if reach is not None:
    o_in = jnp.where(reach[..., None, None], o_in, 0.0)
  o = o0.astype(jnp.float32) + o_in
  return o.astype(q.dtype), h_t


def gla(q, k, v, log_g=None, *, h0=None, scale=None, chunk_size=64, impl="auto",
        segment_ids=None, axis: str = SEQ_AXIS):
  """``lsm.ops.gla.gla``, sequence-parallel over ``axis`` when the current mesh
  has it with size > 1 (module docstring); the op itself otherwise.

  Args:
    q, k: [B, T, H, K] (or G key groups, [B, T, G, K], repeated to H heads
      here when the sequence is split); v: [B, T, H, V]; log_g: [B, T, H, K],
      [B, T, H] or None;
      h0: optional [B, H, K, V] float32; scale, chunk_size, impl, segment_ids:
      as the op (documents may start anywhere, slice edges included).
    axis: the mesh axis that splits T.

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  n = seq_size(axis)
  call = functools.partial(_gla_op, scale=scale, chunk_size=chunk_size, impl=impl)
  if n == 1:
    return call(q, k, v, log_g, h0=h0, segment_ids=segment_ids)
  jax.eval_shape(lambda *a: call(*a[:4], h0=a[4], segment_ids=a[5]),
                 q, k, v, log_g, h0, segment_ids)  # the op's own checks
  B, T, H, K = (*q.shape[:2], v.shape[2], q.shape[3])
  if q.shape[2] != H:  # key groups: the slices' summaries are per head
    q, k = (jnp.repeat(x, H // q.shape[2], axis=2) for x in (q, k))
  _check_length("gla", T, n, axis)
  s = K ** -0.5 if scale is None else float(scale)
  mesh = _mesh()
  bs, hs = _layout(mesh, B, H)
  body = functools.partial(gla_slice, call=call, scale=s, axis=axis)
  x_spec, st_spec, seg_spec = P(bs, axis, hs), P(bs, hs), P(bs, axis)
  return _run(body, mesh, (q, k, v, log_g, h0, *_with_resets(segment_ids)),
              (x_spec, x_spec, x_spec, x_spec, st_spec, seg_spec, seg_spec),
              (x_spec, st_spec))


# -- delta rule ---------------------------------------------------------------


def delta_rule_slice(q, k, v, beta, log_g, h0, segment_ids=None, resets=None, *,
                     call, axis: str):
  """One device's part of the sequence-parallel delta rule (as ``gla_slice``).

  Args:
    q, k, v, beta, log_g: this slice of the op's inputs (log_g may be None).
    h0: [B, H, K, V] float32 state before the first slice, or None for zeros.
    segment_ids, resets: as in ``gla_slice``.
    call: the op, ``call(q, k, v, beta, log_g=..., h0=..., segment_ids=...)
      -> (o, h_t)``.
    axis: the sequence axis name.

  Returns:
    o: [B, t, H, V] in q.dtype; h_T: [B, H, K, V] float32 after the last slice.
  """
  B, t, H, K = q.shape  # local sizes
  V = v.shape[-1]
  # State [I | 0] and values [0 | v]: the first K state columns carry the
  # slice's transition M, the last V its zero-start state D (module docstring).
  v_aug = jnp.concatenate([jnp.zeros((B, t, H, K), v.dtype), v], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
  h_aug = jnp.concatenate([eye, jnp.zeros((B, H, K, V), jnp.float32)], axis=-1)
  o_aug, summary = call(q, k, v_aug, beta, log_g=log_g, h0=h_aug,
                        segment_ids=segment_ids)  # [.., K + V]
  if resets is not None:
    # The op's resets zero the identity columns after any document start but
    # the slice's first token, which the op cannot see: a document that starts
    # there drops the incoming state altogether (M = 0 and Q = 0).
    keep = jnp.logical_not(resets[:, 0])
    summary = jnp.concatenate(
        [jnp.where(keep[:, None, None, None], summary[..., :K], 0.0),
         summary[..., K:]], axis=-1)
    o_aug = jnp.concatenate(
        [jnp.where(keep[:, None, None, None], o_aug[..., :K], 0),
         o_aug[..., K:]], axis=-1)

  def apply(x, h):  # S_out = M S_in + D
    return _einsum("bhkj,bhjv->bhkv", x[..., :K], h) + x[..., K:]

  h_in, h_t = _fold(summary, h0, apply, axis, h_aug[..., K:])
  o = o_aug[..., K:].astype(jnp.float32) + _einsum(
      "bthk,bhkv->bthv", o_aug[..., :K].astype(jnp.float32), h_in)
  return o.astype(q.dtype), h_t


def delta_rule(q, k, v, beta, *, log_g=None, h0=None, scale=None, chunk_size=64,
               impl="auto", segment_ids=None, axis: str = SEQ_AXIS):
  """``lsm.ops.delta_rule.delta_rule``, sequence-parallel over ``axis`` when the
  current mesh has it with size > 1 (module docstring); the op otherwise.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] in [0, 2]; log_g:
      optional [B, T, H]; h0: optional [B, H, K, V] float32; scale, chunk_size,
      impl, segment_ids: as the op.
    axis: the mesh axis that splits T.

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  n = seq_size(axis)
  call = functools.partial(_delta_rule_op, scale=scale, chunk_size=chunk_size,
                           impl=impl)
  if n == 1:
    return call(q, k, v, beta, log_g=log_g, h0=h0, segment_ids=segment_ids)
  jax.eval_shape(lambda *a: call(*a[:4], log_g=a[4], h0=a[5], segment_ids=a[6]),
                 q, k, v, beta, log_g, h0, segment_ids)  # the op's own checks
  B, T, H, _ = q.shape
  _check_length("delta_rule", T, n, axis)
  mesh = _mesh()
  bs, hs = _layout(mesh, B, H)
  body = functools.partial(delta_rule_slice, call=call, axis=axis)
  x_spec, st_spec, seg_spec = P(bs, axis, hs), P(bs, hs), P(bs, axis)
  return _run(body, mesh,
              (q, k, v, beta, log_g, h0, *_with_resets(segment_ids)),
              (x_spec,) * 5 + (st_spec, seg_spec, seg_spec), (x_spec, st_spec))


# -- DPLR (diagonal plus low rank) --------------------------------------------


def dplr_slice(q, a, b, u, v, log_g, h0, segment_ids=None, resets=None, *, call,
               axis: str):
  """One device's part of sequence-parallel ``dplr`` (as ``delta_rule_slice``:
  the op runs once on the state [I | 0] and values [0 | v], so its final state
  is the slice's [M | D] and its first K output columns the readout Q_t).

  Args:
    q, a, b, u, v, log_g: this slice of the op's inputs (log_g may be None).
    h0: [B, H, K, V] float32 state before the first slice, or None for zeros.
    segment_ids, resets: as in ``gla_slice``.
    call: the op, ``call(q, a, b, u, v, log_g, h0=..., segment_ids=...) ->
      (o, h_t)``.
    axis: the sequence axis name.

  Returns:
    o: [B, t, H, V] in q.dtype; h_T: [B, H, K, V] float32 after the last slice.
  """
  B, t, H, K = q.shape  # local sizes
  V = v.shape[-1]
  v_aug = jnp.concatenate([jnp.zeros((B, t, H, K), v.dtype), v], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
  h_aug = jnp.concatenate([eye, jnp.zeros((B, H, K, V), jnp.float32)], axis=-1)
  o_aug, summary = call(q, a, b, u, v_aug, log_g, h0=h_aug,
                        segment_ids=segment_ids)  # [.., K + V]
  if resets is not None:
    # A document starting at the slice's first token (which the op cannot
    # see) drops the incoming state: M = 0 and Q = 0 (as delta_rule_slice).
    keep = jnp.logical_not(resets[:, 0])
    summary = jnp.concatenate(
        [jnp.where(keep[:, None, None, None], summary[..., :K], 0.0),
         summary[..., K:]], axis=-1)
    o_aug = jnp.concatenate(
        [jnp.where(keep[:, None, None, None], o_aug[..., :K], 0),
         o_aug[..., K:]], axis=-1)

  def apply(x, h):  # S_out = M S_in + D
    return _einsum("bhkj,bhjv->bhkv", x[..., :K], h) + x[..., K:]

  h_in, h_t = _fold(summary, h0, apply, axis, h_aug[..., K:])
  o = o_aug[..., K:].astype(jnp.float32) + _einsum(
      "bthk,bhkv->bthv", o_aug[..., :K].astype(jnp.float32), h_in)
  return o.astype(q.dtype), h_t


def dplr(q, a, b, u, v, log_g=None, *, h0=None, scale=None, chunk_size=64,
         impl="auto", segment_ids=None, axis: str = SEQ_AXIS):
  """``lsm.ops.dplr.dplr``, sequence-parallel over ``axis`` when the current
  mesh has it with size > 1 (module docstring); the op otherwise.

  Args:
    q, a, b, u: [B, T, H, K]; v: [B, T, H, V]; log_g: [B, T, H, K], [B, T, H]
      or None; h0: optional [B, H, K, V] float32; scale, chunk_size, impl,
      segment_ids: as the op.
    axis: the mesh axis that splits T.

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  n = seq_size(axis)
  call = functools.partial(_dplr_op, scale=scale, chunk_size=chunk_size,
                           impl=impl)
  if n == 1:
    return call(q, a, b, u, v, log_g, h0=h0, segment_ids=segment_ids)
  jax.eval_shape(lambda *x: call(*x[:6], h0=x[6], segment_ids=x[7]),
                 q, a, b, u, v, log_g, h0, segment_ids)  # the op's own checks
  B, T, H, _ = q.shape
  _check_length("dplr", T, n, axis)
  mesh = _mesh()
  bs, hs = _layout(mesh, B, H)
  body = functools.partial(dplr_slice, call=call, axis=axis)
  x_spec, st_spec, seg_spec = P(bs, axis, hs), P(bs, hs), P(bs, axis)
  return _run(body, mesh,
              (q, a, b, u, v, log_g, h0, *_with_resets(segment_ids)),
              (x_spec,) * 6 + (st_spec, seg_spec, seg_spec), (x_spec, st_spec))


# -- diagonal SSM scan --------------------------------------------------------


# Cumulative products over T (axis 1) by an associative scan: no logs or
# divisions, so zero and negative decays are exact, and so are their gradients.
#
# Rematerialised in the backward pass (jax.checkpoint: the only residual is the
# input). Workaround, jax/jaxlib 0.11.2, 2026-12-01: autodiff of
# associative_scan keeps zero-size residuals (its recursion combines empty
# slices, e.g. [B, 0, H, K] at slice lengths t = 2, 4, 5, 8-11, 16-19, ...);
# under shard_map they become zero-size operands of the backward
# sdy.manual_computation, and Shardy's canonicalizer
# (ManualComputationUnusedInputsPattern) segfaults compiling any
# manual_computation whose body uses a zero-size operand (XLA CPU, with or
# without --xla_backend_optimization_level=0; jax 0.12.0.1 compiles it).
# Recomputing the scan in the backward keeps the empty slices inside the body.
# Same forward numerics on every jax version; the backward is no slower (it
# keeps one array, not every level of the scan tree). test_sequence.py checks
# that no shard_map operand here is zero-size.
_cumprod = jax.checkpoint(
    lambda a: jax.lax.associative_scan(jnp.multiply, a, axis=1))


def ssm_scan_slice(a, b, h0, resets=None, *, call, axis: str):
  """One device's part of the sequence-parallel SSM scan (as ``gla_slice``).

  Args:
    a, b: this slice of the op's inputs, [B, t, ...].
    h0: [B, ...] float32 state before the first slice, or None for zeros.
    resets: this slice of the row's reset flags (``segments.resets`` of the
      whole row), [B, t], or None. A reset is a_t = 0 (exact for this scan),
      applied here, so the op and the transition both see it.
    call: the op, ``call(a, b, h0=...) -> (y, h_t)``.
    axis: the sequence axis name.

  Returns:
    y: [B, t, ...] in b.dtype; h_T: [B, ...] float32 after the last slice.
  """
  if resets is not None:
    a = _segments.zero_at_resets(a, resets)
  y0, d = call(a, b, h0=None)
  cum = _cumprod(a.astype(jnp.float32))  # [B, t, ...]
  summary = jnp.stack([cum[:, -1], d])  # [2, B, ...]
  apply = lambda x, h: x[0] * h + x[1]  # noqa: E731
  h_in, h_t = _fold(summary, h0, apply, axis, d)
  y = y0.astype(jnp.float32) + cum * h_in[:, None]
  return y.astype(b.dtype), h_t


def ssm_scan(a, b, *, h0=None, impl="auto", segment_ids=None,
             axis: str = SEQ_AXIS):
  """``lsm.ops.ssm_scan.ssm_scan``, sequence-parallel over ``axis`` when the
  current mesh has it with size > 1 (module docstring); the op otherwise.

  Args:
    a: [B, T, ...] decays in [-1, 1]; b: [B, T, ...] inputs; h0: optional
      [B, ...] float32; impl, segment_ids: as the op. The first trailing dim
      (heads or channels) is split over ``tensor`` where it divides.
    axis: the mesh axis that splits T.

  Returns:
    y: [B, T, ...] in b.dtype; h_T: [B, ...] float32.
  """
  n = seq_size(axis)
  call = functools.partial(_ssm_scan_op, impl=impl)
  if n == 1:
    return call(a, b, h0=h0, segment_ids=segment_ids)
  jax.eval_shape(lambda *x: call(x[0], x[1], h0=x[2], segment_ids=x[3]),
                 a, b, h0, segment_ids)  # the op's own checks
  B, T = b.shape[:2]
  _check_length("ssm_scan", T, n, axis)
  mesh = _mesh()
  bs, hs = _layout(mesh, B, b.shape[2] if b.ndim > 2 else 1)
  if b.ndim == 2:
    hs = None
  body = functools.partial(ssm_scan_slice, call=call, axis=axis)
  x_spec = P(bs, axis, hs) if hs is not None else P(bs, axis)
  st_spec = P(bs, hs) if hs is not None else P(bs)
  resets = None if segment_ids is None else _segments.resets(segment_ids)
  return _run(body, mesh, (a, b, h0, resets),
              (x_spec, x_spec, st_spec, P(bs, axis)), (x_spec, st_spec))


# -- selective scan (Mamba) --------------------------------------------------


def selective_scan_slice(x, dt, A, B, C, D, h0, segment_ids=None, resets=None, *,
                         call, axis: str):
  """One device's part of the sequence-parallel selective scan (as
  ``gla_slice``).

  Args:
    x, dt: this slice's [B, t, E]; A: [E, N]; B, C: [B, t, N] or [B, t, G, N];
      D: [E] or None.
    h0: [B, E, N] float32 state before the first slice, or None for zeros.
    segment_ids, resets: this slice of the row's document ids and of their
      global reset flags (``segments.resets`` of the whole row), [B, t]; or
      None. The op sees the ids, so resets inside the slice are its own; a
      document that starts at the slice's first token (which the op cannot
      tell) drops the incoming state: M = 0 and a zero entering state.
    call: the op, ``call(x, dt, A, B, C, D=..., h0=..., segment_ids=...) ->
      (y, h_t)``.
    axis: the sequence axis name.

  Returns:
    y: [B, t, E] in x.dtype; h_T: [B, E, N] float32 after the last slice.
  """
  N = A.shape[-1]
  grouped = B.ndim == 4
  B2 = B if grouped else B[:, :, None]
  B2 = jnp.concatenate([B2, jnp.zeros_like(B2)], axis=-1)  # [B, t, G, 2N]
  shape = (x.shape[0], x.shape[-1], N)
  h2 = jnp.concatenate([jnp.zeros(shape, jnp.float32),
                        jnp.ones(shape, jnp.float32)], axis=-1)
  # Final state [D | M]: zero-start state and decay product (module docstring).
  _, s = call(x, dt, jnp.concatenate([A, A], axis=-1), B2, jnp.zeros_like(B2),
              D=None, h0=h2, segment_ids=segment_ids)
  d, m = s[..., :N], s[..., N:]
  keep = None if resets is None else jnp.logical_not(resets[:, 0])[:, None, None]
  if keep is not None:
    m = jnp.where(keep, m, 0.0)
  apply = lambda v, h: v[0] * h + v[1]  # noqa: E731
  h_in, h_t = _fold(jnp.stack([m, d]), h0, apply, axis, d)
  if keep is not None:
    h_in = jnp.where(keep, h_in, 0.0)
  y, _ = call(x, dt, A, B, C, D=D, h0=h_in, segment_ids=segment_ids)
  return y, h_t


def selective_scan(x, dt, A, B, C, *, D=None, h0=None, chunk_size=64, impl="auto",
                   eigenvalue_range="positive", segment_ids=None,
                   axis: str = SEQ_AXIS):
  """``lsm.ops.selective_scan.selective_scan``, sequence-parallel over ``axis``
  when the current mesh has it with size > 1 (module docstring); the op
  otherwise.

  Args:
    x, dt: [B, T, E]; A: [E, N]; B, C: [B, T, N] or [B, T, G, N]; D: optional
      [E]; h0: optional [B, E, N] float32; chunk_size, impl, eigenvalue_range,
      segment_ids: as the op. E is split over ``tensor`` where it divides (G
      too, for grouped B and C).
    axis: the mesh axis that splits T.

  Returns:
    y: [B, T, E] in x.dtype; h_T: [B, E, N] float32.
  """
  n = seq_size(axis)
  call = functools.partial(_selective_scan_op, chunk_size=chunk_size, impl=impl,
                           eigenvalue_range=eigenvalue_range)
  if n == 1:
    return call(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids)
  jax.eval_shape(lambda *a: call(*a[:5], D=a[5], h0=a[6], segment_ids=a[7]),
                 x, dt, A, B, C, D, h0, segment_ids)  # the op's own checks
  Bsz, T, E = x.shape
  _check_length("selective_scan", T, n, axis)
  mesh = _mesh()
  grouped = B.ndim == 4
  # Channels split over ``tensor``; grouped B and C split with them (a split
  # of G groups is one of E = G P channels), shared ones are replicated.
  bs, hs = _layout(mesh, Bsz, B.shape[2] if grouped else E)
  body = functools.partial(selective_scan_slice, call=call, axis=axis)
  x_spec, st_spec, seg_spec = P(bs, axis, hs), P(bs, hs), P(bs, axis)
  bc_spec = P(bs, axis, hs) if grouped else P(bs, axis)
  return _run(body, mesh, (x, dt, A, B, C, D, h0, *_with_resets(segment_ids)),
              (x_spec, x_spec, P(hs), bc_spec, bc_spec, P(hs), st_spec, seg_spec,
               seg_spec), (x_spec, st_spec))


# -- softmax attention (hybrid stacks) ----------------------------------------


def _attention_mask(q_pos, k_pos, window, q_doc=None, k_doc=None):
  """bool [B or 1, 1, t, S]: causal, within the window, and (with documents)
  in the query's document. q_pos [t], k_pos [S]; q_doc [B, t], k_doc [B, S]."""
  mask = k_pos[None, :] <= q_pos[:, None]  # [t, S]
  if window is not None:
    mask &= k_pos[None, :] > q_pos[:, None] - window
  mask = mask[None, None]
  if q_doc is not None:
    mask = mask & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
  return mask


def attention_slice(q, k, v, doc=None, *, window: int | None, axis: str):
  """One device's part of sequence-parallel causal attention: its query slice
  against all keys and values, gathered in one collective, in global positions.

  Args:
    q: [B, t, N, D] this slice's queries; k, v: [B, t, N_kv, D].
    doc: this slice of ``segments.document_index`` of the whole row, [B, t],
      or None;
      gathered like the keys (a second, O(T)-int collective).
    window: sliding-window length, or None.
    axis: the sequence axis name.

  Returns:
    [B, t, N, D] in q.dtype.
  """
  t = q.shape[1]
  kv = jax.lax.all_gather(jnp.stack([k, v]), axis, axis=2, tiled=True)
  q_pos = jax.lax.axis_index(axis) * t + jnp.arange(t)
  k_doc = None if doc is None else jax.lax.all_gather(doc, axis, axis=1, tiled=True)
  mask = _attention_mask(q_pos, jnp.arange(kv.shape[2]), window, doc, k_doc)
  return jax.nn.dot_product_attention(q, kv[0], kv[1], mask=mask,
                                      implementation=None)


def attention(q, k, v, *, window: int | None = None, segment_ids=None,
              axis: str = SEQ_AXIS):
  """Causal softmax attention, ``jax.nn.dot_product_attention(q, k, v,
  is_causal=True, local_window_size=(window - 1, 0) or None)``, with keys and
  values all-gathered over ``axis`` when the current mesh has it with size > 1
  (LASP-2H).

  Args:
    q: [B, T, N, D] queries; k, v: [B, T, N_kv, D], N_kv dividing N (grouped
      query attention, as jax.nn.dot_product_attention groups heads).
    window: sliding-window length W (positions t-W+1..t), or None.
    segment_ids: optional int [B, T] document ids of packed rows: a query
      attends only to keys of its own document.
    axis: the mesh axis that splits T.

  Returns:
    [B, T, N, D] in q.dtype.
  """
  n = seq_size(axis)
  local = None if window is None else (window - 1, 0)
  doc = None
  if segment_ids is not None:
    _segments.check("attention", segment_ids, *q.shape[:2])
    doc = _segments.document_index(segment_ids)
  if n == 1:
    if doc is not None:
      pos = jnp.arange(q.shape[1])
      return jax.nn.dot_product_attention(
          q, k, v, mask=_attention_mask(pos, pos, window, doc, doc),
          implementation=None)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        local_window_size=local,
                                        implementation=None)
  B, T, N = q.shape[:3]
  _check_length("attention", T, n, axis)
  if k.shape != v.shape or k.shape[:2] != (B, T) or N % k.shape[2]:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}; expected "
                     "q [B, T, N, D] and k, v [B, T, N_kv, D] with N_kv dividing N")
  mesh = _mesh()
  bs, hs = _layout(mesh, B, k.shape[2])
  body = functools.partial(attention_slice, window=window, axis=axis)
  spec = P(bs, axis, hs)
  return _run(body, mesh, (q, k, v, doc), (spec, spec, spec, P(bs, axis)), spec)
