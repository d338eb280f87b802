"""unit_lower_inverse: forward against a float64 inverse, VJP against autodiff
through plain forward substitution (an independent derivation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.ops.common import triangular
from tests import numerics


@pytest.mark.parametrize("n", [1, 8, 16, 48, 64])  # substitution, doubling, fallback
def test_inverse_matches_float64(n):
  l = 0.3 * jax.random.normal(jax.random.key(n), (3, n, n))
  t = triangular.unit_lower_inverse(l)
  a = np.eye(n) + np.tril(np.asarray(l, np.float64), -1)
  numerics.assert_close(t, np.linalg.inv(a), rtol=numerics.TOLERANCES[("invariant", "float32")],
                        what=f"inverse, n={n}")
  assert np.all(np.triu(np.asarray(t), 1) == 0), "inverse is not lower triangular"


@pytest.mark.parametrize("n", [16, 64])
def test_vjp_matches_autodiff_of_substitution(n):
  l = 0.3 * jax.random.normal(jax.random.key(n), (2, n, n))
  ct = jax.random.normal(jax.random.key(n + 1), (2, n, n))
  _, pull = jax.vjp(triangular.unit_lower_inverse, l)
  _, pull_e = jax.vjp(lambda x: triangular._substitute(jnp.tril(x, -1)), l)
  numerics.assert_close(pull(ct)[0], pull_e(ct)[0],
                        rtol=numerics.TOLERANCES[("invariant", "float32")],
                        what=f"dL, n={n}")
