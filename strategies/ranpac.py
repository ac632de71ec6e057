"""RanPAC (McDonnell et al. 2023, "RanPAC: random projections and pre-trained models for
continual learning"), PILOT's ``ranpac``.

Optionally, the first experience adapts the ViT (``tuning``: adapters by default, as RanPAC's
"first-session adaptation"; ``frozen`` for none), through ``first_session_head`` (PILOT's
cosine head with a learnt scale by default). Then, for every experience, the pooled features
``f`` of its training images (eval transforms) go through a fixed random projection
``h = ReLU(f W_rand)`` (``W_rand``: d x M, standard normal, drawn once) and update

    G <- G + H^T H,     Q <- Q + H^T Y        (Y: one-hot labels of every class)

and the classifier is the ridge solution ``W = (G + lambda I)^-1 Q``, logits ``h W``. lambda is
chosen from 10^-8 .. 10^8 by the mean squared error on ``validation_fraction`` of the
experience's images, held out of a solve on the rest (RanPAC's ``optimise_ridge_parameter``).
The statistics are summed and the ridge solved in fp64, whatever ``training.precision`` is
(the reference keeps and solves them in fp32, which small ridges make unstable; the price is
M^2 x 8 bytes for G: 800 MB at M = 10,000). G is updated and factorised in place, so that is the
solve's peak too (plus the n x n kernel of the lambda search and the projected features).
``precision: float32`` is the reference's arithmetic instead, for comparing with it: fp32
statistics, one LU solve per candidate lambda and one for the weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from incremental.models.net import RandomProjectionOutput
from incremental.progress import bar
from incremental.strategy import StrategyContext
from incremental.timing import phase

from .options import RanPACConfig
from .pretrained import FirstSessionTraining, experience_features

RIDGES = [10.0 ** k for k in range(-8, 9)]


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge I)^-1 Q``, transposed: (classes, M), solved in G's dtype and returned in fp32.
    An fp32 G (``precision: float32``) gets the reference's arithmetic, one LU solve in fp32 (which
    lost half the accuracy on digits at lambda 0.01); an fp64 one, on the CPU, this:

    G + ridge I is positive definite, so one Cholesky factorisation solves it. It is done inside
    G's own memory (LAPACK's ``potrf`` on one triangle): G's upper triangle is first copied from
    its strict lower one, then the factor takes the upper triangle and diagonal while the strict
    lower triangle keeps G. So the solve needs no second M x M matrix (800 MB at M = 10,000), and
    G is defined by its strict lower triangle and diagonal (RanPAC's is symmetric): on return the
    diagonal is G's again and the upper triangle is scratch, which the next solve overwrites
    (an in-place ``addmm_`` update keeps the lower triangle right whatever the upper holds).
    Where rounding left G + ridge I indefinite (a tiny ridge), the same triangle is factorised
    as L D L^T with pivoting instead (``sytrf``, as stable as an LU solve), also in place."""
    from scipy.linalg import lapack

    if gram.device.type != "cpu" or gram.dtype != torch.float64 or not gram.is_contiguous():
        system = gram.clone()
        system.diagonal().add_(ridge)
        return torch.linalg.solve(system, targets.to(gram.dtype)).T.float()
    matrix, rhs = gram.numpy(), targets.double().numpy()
    diagonal = matrix.diagonal().copy()
    try:
        # matrix.T is matrix's memory in Fortran order: its lower triangle is matrix's upper one
        _restore_upper(matrix, diagonal + ridge)
        factor, info = lapack.dpotrf(matrix.T, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            solution, info = lapack.dpotrs(factor, rhs, lower=1)
        else:
            _restore_upper(matrix, diagonal + ridge)
            factor, pivots, info = lapack.dsytrf(matrix.T, lower=1, lwork=64 * len(matrix), overwrite_a=1)
            solution, info = lapack.dsytrs(factor, pivots, rhs, lower=1)
    finally:
        matrix.ravel()[:: len(matrix) + 1] = diagonal  # G's diagonal; the upper triangle stays scratch
    if info != 0:
        raise ArithmeticError(f"RanPAC's ridge system is singular at lambda {ridge} (LAPACK info {info})")
    return torch.from_numpy(solution).T.float()


def _restore_upper(matrix: Any, diagonal: Any) -> None:
    """The upper triangle copied back from the strict lower one, row by row (no M x M index
    arrays), and the diagonal set."""
    for row in range(len(matrix) - 1):
        matrix[row, row + 1:] = matrix[row + 1:, row]
    matrix.ravel()[:: len(matrix) + 1] = diagonal


def spectral_fit(fit: torch.Tensor, held: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, left, right)`` with ``held @ W(lambda) = left @ (right / (s + lambda))`` for the ridge
    solution ``W(lambda) = (F^T F + lambda I)^-1 F^T Y`` on ``fit`` (F, n x M), every lambda from one
    eigendecomposition: of the n x n kernel F F^T when n < M (the dual form,
    ``W = F^T (F F^T + lambda I)^-1 Y``), else of the M x M Gram matrix."""
    if len(fit) < fit.shape[1]:
        s, u = torch.linalg.eigh(fit @ fit.T)
        return s, held @ fit.T @ u, u.T @ targets
    s, v = torch.linalg.eigh(fit.T @ fit)
    return s, held @ v, v.T @ (fit.T @ targets)


def choose_ridge(hidden: torch.Tensor, onehot: torch.Tensor, validation_fraction: float,
                 tick: Callable[[int], Any] = lambda n: None) -> float:
    """RanPAC's lambda: the one whose solve on the first part predicts the held-out rest best
    (``tick(1)`` after each candidate). The candidates share one eigendecomposition
    (:func:`spectral_fit`) instead of one M x M solve each."""
    split = int(len(hidden) * (1 - validation_fraction))
    fit, held = hidden[:split], hidden[split:]
    s, left, right = spectral_fit(fit, held, onehot[:split])
    losses = []
    for ridge in RIDGES:
        predictions = left @ (right / (s + ridge).unsqueeze(1))
        losses.append(torch.mean((predictions - onehot[split:]) ** 2).item())
        tick(1)
    return RIDGES[int(torch.tensor(losses).argmin())]


def reference_ridge(hidden: torch.Tensor, onehot: torch.Tensor, validation_fraction: float,
                    tick: Callable[[int], Any] = lambda n: None) -> float:
    """RanPAC's lambda by its own arithmetic, in ``hidden``'s dtype: one LU solve of the M x M
    system on the first part per candidate, scored by the mean squared error on the rest."""
    split = int(len(hidden) * (1 - validation_fraction))
    fit, held = hidden[:split], hidden[split:]
    gram, targets = fit.T @ fit, fit.T @ onehot[:split]
    identity = torch.eye(len(gram), dtype=gram.dtype)
    losses = []
    for ridge in RIDGES:
        weights = torch.linalg.solve(gram + ridge * identity, targets)
        losses.append(torch.mean((held @ weights - onehot[split:]) ** 2).item())
        tick(1)
    return RIDGES[int(torch.tensor(losses).argmin())]


class RanPAC(FirstSessionTraining):
    """RanPAC: a random projection with ReLU and a ridge-regression head, accumulated over experiences."""

    def __init__(self, config: RanPACConfig, context: StrategyContext):
        super().__init__(config, context)
        self.projection: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.ridges: list[float] = []
        self.dtype = torch.float64 if config.precision == "float64" else torch.float32

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        if experience == 0:
            for p in strategy.model.backbone.parameters():  # adapted once, then fixed
                p.requires_grad_(False)
        features, labels = experience_features(strategy, experience, self.context)
        features = features.float().cpu()
        if self.projection is None:
            self.projection = torch.randn(features.shape[1], self.config.projection_dim)
            m = self.config.projection_dim
            # fp64 by default: summed in fp32 over thousands of images, G lost its positive definiteness
            # (an eigenvalue of -0.45 next to 4e7 on digits), and small ridges then broke the solve
            self.gram = torch.zeros(m, m, dtype=self.dtype)
            self.targets = torch.zeros(m, self.context.total_classes, dtype=self.dtype)
        order = torch.randperm(len(features))  # a random held-out part (RanPAC's loader shuffles)
        hidden = torch.relu(features[order].to(self.dtype) @ self.projection.to(self.dtype))
        onehot = torch.nn.functional.one_hot(labels[order], self.context.total_classes).to(self.dtype)
        m, reference = self.config.projection_dim, self.dtype == torch.float32
        label = f"RanPAC ridge ({m} x {m}, {'fp32' if reference else 'fp64'})"
        with phase(strategy, "closed_form"), bar(len(RIDGES) + 1, label, unit="solve") as progress:
            self.gram.addmm_(hidden.T, hidden)  # in place: no M x M temporary
            self.targets.addmm_(hidden.T, onehot)
            choose = reference_ridge if reference else choose_ridge
            ridge = choose(hidden, onehot, self.config.validation_fraction, progress.update)
            self.ridges.append(ridge)
            seen = int(labels.max()) + 1
            weights = ridge_solve(self.gram, self.targets, ridge)[:seen]
            progress.update(1)
        device = next(strategy.model.parameters()).device
        strategy.model.output_adapter = RandomProjectionOutput(self.projection.to(device), weights.to(device),
                                                               cosine=self.config.classifier == "cosine")

    def state_dict(self) -> dict[str, Any]:
        """``gram``: G's strict lower triangle and diagonal (its upper triangle is the last solve's
        scratch; see :func:`ridge_solve`)."""
        return {"projection": self.projection, "gram": self.gram, "targets": self.targets, "ridges": self.ridges}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        self.projection, self.gram, self.targets = state["projection"], state["gram"], state["targets"]
        self.ridges = [float(r) for r in state["ridges"]]
