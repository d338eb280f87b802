"""Word problems: the running product of a sequence of group elements (Merrill et
al. 2024, "The Illusion of State in State-Space Models", github.com/jopetty/
word-problem; Grazzi et al. 2024 for S5 restricted to transpositions).

Groups and element ids (index 0 is always the identity):

  S3, S4, S5  all permutations of {0..n-1} (n = 3, 4, 5), as tuples p (p[i]
              is the image of i), in lexicographic order
              (itertools.permutations(range(n))).
  A5          the 60 even permutations of S5, in the same order.
  S5_swaps    S5, but the inputs are only its 10 transpositions (i j), i < j;
              the running product still ranges over all 120 elements.
  Z60         the cyclic group of order 60, element k, product (a + b) mod 60:
              the abelian control (same order as A5).

Composition order: the product a·b means "apply a, then b", i.e. as tuples
(a·b)[i] = b[a[i]]. The label at position t is the running product
x_0·x_1·...·x_t of the elements seen so far (left to right, as in Merrill et
al.'s ``acc = op(acc, x)``).

Tokens: element g is token 1 + g, for inputs and labels alike; vocab_size is
1 + |G|. Inputs are uniform over the group (over the transpositions for
S5_swaps). size = the number of elements; L = size; every position is an answer.
"""

import dataclasses
import functools
import itertools
from typing import ClassVar

import numpy as np

from lsm.tasks.base import Task, check_choice

GROUPS = ("S3", "S4", "S5", "A5", "Z60", "S5_swaps")
# Permuted points of each permutation group (A5 and S5_swaps: subsets of S5).
_DEGREE = {"S3": 3, "S4": 4, "S5": 5, "A5": 5, "S5_swaps": 5}
ELEMENT0 = 1  # element g is token ELEMENT0 + g


def _is_even(p: tuple[int, ...]) -> bool:
  inversions = sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
  return inversions % 2 == 0


@functools.lru_cache(maxsize=None)
def group_table(group: str) -> tuple[np.ndarray, np.ndarray]:
  """(table, generators) of ``group``.

  table: int32 [|G|, |G|], table[a, b] = id of a·b. generators: int32 [k], the
  element ids that inputs are drawn from.
  """
  check_choice("permutation", "group", group, GROUPS)
  table, gens = _build(group)
  # Cached and shared: read-only so no caller can corrupt another's group.
  table.setflags(write=False)
  gens.setflags(write=False)
  return table, gens


def _permutations(group: str) -> list[tuple[int, ...]]:
  """The elements of a permutation group in id order (module docstring)."""
  elements = list(itertools.permutations(range(_DEGREE[group])))
  if group == "A5":
    elements = [p for p in elements if _is_even(p)]
  return elements


def _build(group: str) -> tuple[np.ndarray, np.ndarray]:
  if group == "Z60":
    k = np.arange(60)
    return ((k[:, None] + k[None, :]) % 60).astype(np.int32), k.astype(np.int32)
  elements = _permutations(group)
  n = len(elements[0])
  perms = np.array(elements)  # [|G|, n]
  g = len(elements)
  # composed[a, b, i] = (a·b)[i] = b[a[i]].
  composed = perms[np.arange(g)[None, :, None], perms[:, None, :]]
  # Tuples -> ids through their base-n codes.
  weights = n ** np.arange(n - 1, -1, -1)
  id_of_code = np.full(n**n, -1, np.int32)
  id_of_code[perms @ weights] = np.arange(g)
  table = id_of_code[composed @ weights]
  if group == "S5_swaps":
    gens = [i for i, p in enumerate(elements)
            if sum(p[j] != j for j in range(n)) == 2]
  else:
    gens = list(range(len(elements)))
  return table, np.array(gens, np.int32)


@functools.lru_cache(maxsize=None)
def element_is_even(group: str) -> np.ndarray:
  """bool [|G|]: whether each element id of a permutation group is an even
  permutation (sign +1). The sign is a homomorphism onto Z2, so tracking it
  is parity: a model can get it right while missing the element (S3: 1/3
  accuracy with the sign exact). Z60 has no sign and raises."""
  check_choice("permutation", "group", group, GROUPS)
  if group == "Z60":
    raise ValueError("permutation: group='Z60' has no permutation sign; "
                     "expected one of S3, S4, S5, A5, S5_swaps")
  out = np.array([_is_even(p) for p in _permutations(group)])
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True)
class Permutation(Task):
  """Word problem on ``group`` (see the module docstring). Options: group."""
  name: ClassVar[str] = "permutation"
  group: str = "S5"

  def __post_init__(self):
    check_choice(self.name, "group", self.group, GROUPS)

  @property
  def order(self) -> int:
    """|G|, the number of group elements."""
    return group_table(self.group)[0].shape[0]

  @property
  def vocab_size(self) -> int:
    return ELEMENT0 + self.order

  @property
  def chance(self) -> float:
    return 1.0 / self.order

  @property
  def min_size(self) -> int:
    return 1

  def max_tokens(self, size: int) -> int:
    return self.check_size(size)

  def _generate(self, rng, size):
    table, gens = group_table(self.group)
    x = gens[rng.integers(0, len(gens), size=size)]
    # Inclusive scan by doubling (Hillis-Steele): after the step with offset k,
    # acc[t] is the product of x[max(0, t - 2k + 1)..t]. Associativity makes
    # this equal to the left-to-right product, in log2(size) vectorised steps.
    acc = x.copy()
    k = 1
    while k < size:
      acc[k:] = table[acc[:-k], acc[k:]]
      k *= 2
    return ELEMENT0 + x, ELEMENT0 + acc, np.ones(size, bool)
