"""The vocabulary of model families: the graphs each exports and the solvers each serves.

A family is what the service needs to know about a kind of model before it runs one: which
graphs its artifact holds, which solvers ``/sample`` accepts, how its likelihood is computed
and whether its manifest carries a time convention. Training (which writes artifacts), the
manifest validator and the service (which validates requests and serves them) all read it
from here. A new family registers itself with :func:`register_family`; nothing else in this
module changes.

Example:
    >>> spec = family("flow_matching")
    >>> spec.graphs, spec.likelihood_methods
    (('velocity', 'velocity_div', 'velocity_jvp'), ('exact', 'hutchinson'))
"""

from __future__ import annotations

from dataclasses import dataclass

from numerics.discrete import DFM_SOLVERS
from numerics.samplers import EDM_SAMPLERS, SAMPLERS
from numerics.solvers import SOLVERS

__all__ = ["COMMON_GRAPHS", "FAMILIES", "ONE_PASS", "FamilySpec", "family", "register_family"]

COMMON_GRAPHS: tuple[str, ...] = ("preprocess", "postprocess")
"""Graphs of every artifact: data units -> model space ``(u, ladj)`` and back."""
ONE_PASS = "exact"
"""The one solver name of models that sample in one pass (flows)."""


@dataclass(frozen=True)
class FamilySpec:
    """What a family's artifacts hold and serve.

    Attributes:
        name: the family's name, as manifests write it.
        graphs: graphs its artifacts export besides :data:`COMMON_GRAPHS`.
        sample_solvers: the ``solver`` values ``/sample`` accepts (``("exact",)``: one pass).
        likelihood_methods: ``method`` values of ``/log_likelihood``; the first is exact. A
            model of a one-pass family serves one of them, its manifest's default
            (:meth:`served_methods`): a residual flow above ``EXACT_MAX_DIM`` dimensions
            serves ``hutchinson`` (a truncated log-det series with Hutchinson's traces),
            every other flow ``exact``.
        likelihood_solvers: ODE solvers of the likelihood integral (``()``: one pass, in
            which case ``solver`` and ``steps`` do not apply to ``/log_likelihood``).
        timed: whether the manifest carries a ``time`` section (ODE models).
        score_kinds: the anomaly score kinds its models can serve (``artifact.scores``).
        optional_graphs: graphs an artifact may add (a score kind may need one).
        manifold: whether its rows lie on a manifold (a ``manifold`` section: the service
            refuses rows off it).
        tokens: whether its rows are integer tokens (a ``tokens`` section: the service
            refuses other values).
        guidance: whether its samplers follow a field or denoiser that classifier-free
            guidance can combine (a label model trained with label dropout takes
            ``guidance``; ``numerics.guidance``).
    """

    name: str
    graphs: tuple[str, ...]
    sample_solvers: tuple[str, ...]
    likelihood_methods: tuple[str, ...] = ("exact",)
    likelihood_solvers: tuple[str, ...] = ()
    timed: bool = False
    score_kinds: tuple[str, ...] = ("nll",)
    optional_graphs: tuple[str, ...] = ()
    manifold: bool = False
    tokens: bool = False
    guidance: bool = False

    @property
    def all_graphs(self) -> tuple[str, ...]:
        return COMMON_GRAPHS + self.graphs

    @property
    def one_pass_likelihood(self) -> bool:
        return not self.likelihood_solvers

    def served_methods(self, default: str | None) -> tuple[str, ...]:
        """The ``method`` values a model whose manifest's default is ``default`` serves: all
        of the family's for an ODE model (one graph per divergence), only its default for
        a one-pass model (its ``log_prob`` graph computes one kind of answer; a card that
        names none: the family's first)."""
        if not self.one_pass_likelihood:
            return self.likelihood_methods
        return (default or self.likelihood_methods[0],)


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family to the vocabulary (idempotent for an equal spec)."""
    known = FAMILIES.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"family {spec.name!r} is already registered differently")
    FAMILIES[spec.name] = spec
    return spec


def family(name: str) -> FamilySpec:
    """The spec of family ``name``, or a ValueError listing the known families."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: "
                         f"{', '.join(sorted(FAMILIES))}") from None


_ODE_GRAPHS = ("velocity", "velocity_div", "velocity_jvp")
register_family(FamilySpec("flow", graphs=("log_prob", "sample"), sample_solvers=(ONE_PASS,),
                           likelihood_methods=("exact", "hutchinson"),
                           score_kinds=("nll", "latent"), optional_graphs=("encode",)))
register_family(FamilySpec("diffusion", graphs=_ODE_GRAPHS, sample_solvers=SOLVERS + SAMPLERS,
                           likelihood_methods=("exact", "hutchinson"),
                           likelihood_solvers=SOLVERS, timed=True, guidance=True,
                           score_kinds=("nll", "denoise", "dte")))
register_family(FamilySpec("flow_matching", graphs=_ODE_GRAPHS, sample_solvers=SOLVERS,
                           likelihood_methods=("exact", "hutchinson"),
                           likelihood_solvers=SOLVERS, timed=True, guidance=True,
                           score_kinds=("nll", "denoise", "dte")))
register_family(FamilySpec("edm", graphs=_ODE_GRAPHS, sample_solvers=SOLVERS + EDM_SAMPLERS,
                           likelihood_methods=("exact", "hutchinson"),
                           likelihood_solvers=SOLVERS, timed=True, guidance=True))
register_family(FamilySpec("rfm", graphs=_ODE_GRAPHS, sample_solvers=SOLVERS,
                           likelihood_methods=("exact", "hutchinson"),
                           likelihood_solvers=SOLVERS, timed=True, manifold=True,
                           guidance=True))
register_family(FamilySpec("dfm", graphs=("denoiser",), sample_solvers=DFM_SOLVERS,
                           likelihood_methods=("elbo",), tokens=True, guidance=True))
