"""A tour of lsm's ops on an embedded default, no downloads. Run:

  make demo            # or: python experiments/demo_ops.py [--T 512] [--seed 0]

For GLA (per-channel gates), the delta rule (Gated DeltaNet with beta in [0, 2],
i.e. negative eigenvalues) and the diagonal SSM scan (decays in [-1, 1]) it runs the
chunked impl against the float32 token-by-token reference (outputs, final states
and the gradients of every input), times both, and then decodes: prefill a prompt
with the chunked form and continue token by token with the ``*_step`` function,
checking that the continuation matches a single parallel run.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsm.ops.delta_rule import delta_rule, delta_rule_step
from lsm.ops.gla import gla, gla_step
from lsm.ops.ssm_scan import ssm_scan, ssm_scan_step


def _inputs(seed, B, T, H, K, V):
  ks = jax.random.split(jax.random.key(seed), 6)
  k = jax.random.normal(ks[1], (B, T, H, K))
  return dict(
      q=jax.random.normal(ks[0], (B, T, H, K)),
      k_gla=k / K ** 0.5,
      k_unit=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
      v=jax.random.normal(ks[2], (B, T, H, V)),
      log_g=jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 2.0),
      log_g_head=jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0),
      beta=2.0 * jax.random.uniform(ks[4], (B, T, H)),  # eigenvalues in [-1, 1]
      a=jax.random.uniform(ks[5], (B, T, H, K), minval=-1.0, maxval=1.0),
  )


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def compare(name, op, args):
  """Chunked vs reference: value, final state and gradients, plus fwd+bwd time."""

  def loss_and_grads(impl):
    def loss(*xs):
      o, h = op(*xs, impl=impl)
      return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(h)), (o, h)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                      has_aux=True))

  results = {}
  for impl in ("reference", "chunked"):
    fn = loss_and_grads(impl)
    ms = _timed(fn, *args)
    (_, (o, h)), grads = fn(*args)
    results[impl] = (o, h, grads, ms)
  o_r, h_r, g_r, ms_r = results["reference"]
  o_c, h_c, g_c, ms_c = results["chunked"]
  grad_err = max(_rel(a, b) for a, b in zip(g_c, g_r))
  print(f"{name:<12} rel.err o {_rel(o_c, o_r):.1e}  h_T {_rel(h_c, h_r):.1e}  "
        f"grads {grad_err:.1e} | fwd+bwd reference {ms_r:8.1f} ms, "
        f"chunked {ms_c:7.1f} ms ({ms_r / ms_c:4.1f}x)")


def decode(name, op, step, seq_args, step_args, prompt):
  """Prefill ``prompt`` tokens in parallel, then decode the rest one by one."""
  o_full, h_full = jax.jit(lambda *a: op(*a, impl="chunked"))(*seq_args)
  _, h = jax.jit(lambda *a: op(*a, impl="chunked"))(
      *(x[:, :prompt] for x in seq_args))
  step = jax.jit(step)
  outs = []
  for t in range(prompt, seq_args[0].shape[1]):
    o_t, h = step(*(x[:, t] for x in step_args), h)
    outs.append(o_t)
  err = _rel(jnp.stack(outs, 1), o_full[:, prompt:])
  print(f"{name:<12} prefill {prompt} tokens + {len(outs)} decode steps: "
        f"rel.err vs parallel {err:.1e}, final state {_rel(h, h_full):.1e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--T", type=int, default=512, help="sequence length")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  B, H, K, V = 2, 4, 64, 64
  x = _inputs(args.seed, B, args.T, H, K, V)
  print(f"lsm ops demo: jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"B={B} T={args.T} H={H} K={K} V={V}, float32\n")

  print("chunked vs the float32 reference (outputs, final states, all gradients):")
  compare("gla", gla, (x["q"], x["k_gla"], x["v"], x["log_g"]))
  compare("gated delta", lambda q, k, v, b, g, impl: delta_rule(
      q, k, v, b, log_g=g, impl=impl),
          (x["q"], x["k_unit"], x["v"], x["beta"], x["log_g_head"]))
  compare("ssm_scan", ssm_scan, (x["a"], x["v"]))

  print("\nrecurrent decoding with the *_step functions:")
  prompt = args.T - 16
  decode("gla", gla, lambda q, k, v, g, h: gla_step(q, k, v, g, h),
         (x["q"], x["k_gla"], x["v"], x["log_g"]),
         (x["q"], x["k_gla"], x["v"], x["log_g"]), prompt)
  decode("gated delta",
         lambda q, k, v, b, g, impl: delta_rule(q, k, v, b, log_g=g, impl=impl),
         lambda q, k, v, b, g, h: delta_rule_step(q, k, v, b, h, log_g_t=g),
         (x["q"], x["k_unit"], x["v"], x["beta"], x["log_g_head"]),
         (x["q"], x["k_unit"], x["v"], x["beta"], x["log_g_head"]), prompt)
  decode("ssm_scan", ssm_scan, ssm_scan_step, (x["a"], x["v"]), (x["a"], x["v"]),
         prompt)


if __name__ == "__main__":
  main()
