"""The method table: one row per training method, read by every layer that needs to know
which methods exist, which ``method.*`` keys each one uses, how a step is costed and which
mask it keeps.

Config validation (the ``method.name`` choices), the search space (conditional keys,
define-by-run), FLOPs (:func:`ssam_tune.method.flops.step_cost`), training (which optimizer, which
mask refresh) and the exports (which hyper-parameters apply to a trial) all read
:data:`METHODS`; nothing else lists the methods.

Cost rules (relative to one SGD step = one forward F + one backward B):

- ``"one_pass"``: SGD, 1.
- ``"two_passes"``: SAM, 2 (gradient at w, then at w + e; Eq. 2-3).
- ``"sparse_first_backward"``: SSAM and SAM-ON, the paper's idealisation (footnote to
  Tables 1-3): only the first backward (the gradient at w that builds e) is sparse,
  1 + (F + (1 - s) B)/(F + B). Executed, the step costs what its two passes run
  (:mod:`ssam_tune.method.flops`): 2 with element masks on dense hardware, less when whole tensors
  are left out of the first pass (tensor granularity, SAM-ON).

Pure data: importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COST_RULES", "MASK_KINDS", "METHODS", "TENSOR_SCORES", "Method", "SPARSE_METHODS", "applies", "method"]

COST_RULES = ("one_pass", "two_passes", "sparse_first_backward")
MASK_KINDS = ("fisher", "dynamic", "random", "norm")
# How SSAM-F's per-weight Fisher scores become one score per tensor (masks.tensor_topk_mask);
# "cost" ranks by weights per backward FLOP alone, the Fisher left out (a control).
TENSOR_SCORES = ("per_flop", "mean", "total", "cost")

# method.* keys shared by every perturbing method, and by every masked one.
_SAM_KEYS = ("rho", "bn_second_pass", "perturb_every", "perturb_from", "perturb_prob")
_MASK_KEYS = ("sparsity", "granularity", "T_m", "normalize", "mask_unit", "fixed_mask")


@dataclass(frozen=True)
class Method:
    """One row of the table.

    ``keys``: the ``method.*`` keys (without the section) the method reads; a search samples
    only these and the exports show only these. ``mask``: the mask kind of a sparse method
    (fisher: SSAM-F, Eq. 5; dynamic: SSAM-D, Eq. 7-9; random; norm: SAM-ON's fixed mask of
    the normalization layers), None for dense methods.
    """

    name: str
    title: str
    keys: tuple[str, ...]
    cost: str
    mask: str | None = None

    @property
    def sparse(self) -> bool:
        return self.mask is not None

    @property
    def perturbs(self) -> bool:
        return self.cost != "one_pass"


METHODS: dict[str, Method] = {
    "sgd": Method("sgd", "SGD", (), "one_pass"),
    "sam": Method("sam", "SAM", _SAM_KEYS, "two_passes"),
    "ssam_f": Method("ssam_f", "SSAM-F", _SAM_KEYS + _MASK_KEYS + ("N_F", "fisher_bn", "tensor_score"),
                     "sparse_first_backward", "fisher"),
    "ssam_d": Method("ssam_d", "SSAM-D", _SAM_KEYS + _MASK_KEYS + ("alpha", "drop"),
                     "sparse_first_backward", "dynamic"),
    "ssam_random": Method("ssam_random", "SSAM random mask", _SAM_KEYS + _MASK_KEYS,
                          "sparse_first_backward", "random"),
    # Mueller et al., NeurIPS 2023: perturb only the normalization layers, e normalised over
    # them (||e|| = rho); the sparsity is the model's, not a key.
    "sam_on": Method("sam_on", "SAM-ON", _SAM_KEYS, "sparse_first_backward", "norm"),
}
SPARSE_METHODS = tuple(name for name, method_row in METHODS.items() if method_row.sparse)
# Every method.* key that some method uses; "name" is the one every method has.
_ANY_KEYS = frozenset(k for method_row in METHODS.values() for k in method_row.keys)


def method(name: str) -> Method:
    """The row of ``name``; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choices: {', '.join(METHODS)}") from None


def applies(key: str, name: str) -> bool:
    """Whether the dotted config ``key`` means something for method ``name``: every key
    outside ``method.`` does, and ``method.name``; a ``method.*`` key only for the methods
    whose row lists it."""
    if not key.startswith("method.") or key == "method.name":
        return True
    short = key.removeprefix("method.")
    if short not in _ANY_KEYS:
        return True  # not a per-method key
    method_row = METHODS.get(name)
    return True if method_row is None else short in method_row.keys  # an unknown (e.g. renamed) method: show all
