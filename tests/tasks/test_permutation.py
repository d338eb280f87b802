"""Word-problem labels against composing permutation tuples in pure Python."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.tasks.permutation import (GROUPS, Permutation, element_is_even,
                                   group_table)


def _elements(group):
  """The ids' meaning, rebuilt independently: tuples (or ints for Z60)."""
  if group == "Z60":
    return list(range(60))
  n = {"S3": 3, "S4": 4}.get(group, 5)
  perms = list(itertools.permutations(range(n)))
  if group == "A5":
    # Even permutations: an even number of even-length cycles.
    def even(p):
      seen, swaps = set(), 0
      for i in range(len(p)):
        j, length = i, 0
        while j not in seen:
          seen.add(j)
          j, length = p[j], length + 1
        swaps += max(length - 1, 0)
      return swaps % 2 == 0
    perms = [p for p in perms if even(p)]
  return perms


def _then(a, b, group):
  """a·b: apply a, then b."""
  if group == "Z60":
    return (a + b) % 60
  return tuple(b[a[i]] for i in range(len(a)))


@pytest.mark.parametrize("group", GROUPS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 150))
def test_labels_are_running_products(group, seed, size):
  task = Permutation(group=group)
  elements = _elements(group)
  ex = task.example(np.random.default_rng(seed), size)
  assert ex["mask"].all()
  acc = None
  for x, y in zip(ex["inputs"].tolist(), ex["targets"].tolist()):
    g = elements[x - 1]
    acc = g if acc is None else _then(acc, g, group)
    assert elements[y - 1] == acc


def test_orders_chance_and_vocabulary():
  for group, order in (("S3", 6), ("S4", 24), ("S5", 120), ("A5", 60),
                       ("Z60", 60), ("S5_swaps", 120)):
    task = Permutation(group=group)
    assert task.order == order and task.vocab_size == order + 1
    assert task.chance == pytest.approx(1 / order)
    assert len(_elements(group)) == order or group == "S5_swaps"


def test_composition_order_worked_example():
  # S3: a swaps 0 and 1, b swaps 1 and 2; a then b sends 0->1->2, 1->0, 2->1.
  elements = _elements("S3")
  a, b = elements.index((1, 0, 2)), elements.index((0, 2, 1))
  table, _ = group_table("S3")
  assert elements[table[a, b]] == (2, 0, 1)
  assert elements[table[b, a]] == (1, 2, 0)  # S3 is not abelian


def test_swaps_only_feed_transpositions():
  elements = _elements("S5")
  ex = Permutation(group="S5_swaps").example(np.random.default_rng(0), 2000)
  used = {elements[x - 1] for x in ex["inputs"].tolist()}
  assert len(used) == 10
  assert all(sum(p[i] != i for i in range(5)) == 2 for p in used)
  # Products of transpositions still reach all of S5.
  assert len(set(ex["targets"].tolist())) == 120


def test_group_structure():
  s5, _ = group_table("S5")
  z60, _ = group_table("Z60")
  a5, _ = group_table("A5")
  s4, _ = group_table("S4")
  assert not np.array_equal(s5, s5.T) and np.array_equal(z60, z60.T)
  assert not np.array_equal(s4, s4.T)
  for table in (s5, z60, a5, s4):
    g = len(table)
    # Latin square (every row and column a permutation of the ids): a group table.
    assert all(sorted(row) == list(range(g)) for row in table.tolist())
    assert all(sorted(col) == list(range(g)) for col in table.T.tolist())
    np.testing.assert_array_equal(table[0], np.arange(g))  # id 0 is the identity
  with pytest.raises(ValueError):
    s5[0, 0] = 1  # the cached table is shared, hence read-only


def test_bad_group():
  with pytest.raises(ValueError, match=r"group='S7'.*'S5_swaps'"):
    Permutation(group="S7")


@pytest.mark.parametrize("group", ["S3", "S4", "S5", "A5", "S5_swaps"])
def test_element_sign_is_the_determinant_and_a_homomorphism(group):
  even = element_is_even(group)
  table, gens = group_table(group)
  for i, p in enumerate(_elements(group)):
    # Sign of p = det of its permutation matrix (independent of inversions).
    det = np.linalg.det(np.eye(len(p))[list(p)])
    assert even[i] == (det > 0), (group, p)
  # sign(a·b) = sign(a) sign(b): a homomorphism onto Z2, so tracking it is parity.
  np.testing.assert_array_equal(even[table], even[:, None] == even[None, :])
  if group == "A5":
    assert even.all()
  if group == "S5_swaps":
    assert not even[gens].any()  # every input flips the sign


def test_element_sign_of_z60_is_refused():
  with pytest.raises(ValueError, match=r"group='Z60' has no permutation sign"):
    element_is_even("Z60")


def test_s4_is_all_24_permutations_of_four_points_closed_under_composition():
  table, gens = group_table("S4")
  elements = _elements("S4")
  assert len(set(elements)) == 24 and len(gens) == 24
  assert elements[0] == (0, 1, 2, 3)  # id 0 is the identity
  # The table composes the tuples (apply a, then b), element by element.
  for a, pa in enumerate(elements):
    for b, pb in enumerate(elements):
      assert elements[table[a, b]] == _then(pa, pb, "S4")
  # Inputs cover the whole group; a long word's running products reach it all.
  ex = Permutation(group="S4").example(np.random.default_rng(0), 2000)
  assert set(ex["inputs"].tolist()) == set(range(1, 25))
  assert set(ex["targets"].tolist()) == set(range(1, 25))
  # 12 even, 12 odd: the sign splits S4 in half, as it does S3 and S5.
  assert element_is_even("S4").sum() == 12
