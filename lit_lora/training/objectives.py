"""Preference losses: DPO (sigmoid, IPO, hinge), SimPO and ORPO, each one small function per pair.

Notation, per pair ``(x, y_w, y_l)`` (prompt, chosen, rejected): ``log pi(y|x)`` is the summed log-prob
of the answer's tokens under the trained model (the adapter on), ``log pi_ref(y|x)`` the same under the
reference (by default the base with the adapter off), ``|y|`` the answer's token count, ``sigma`` the
logistic function. ``logratio_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``logratio_l`` likewise.

Every function returns the loss of each pair (shape ``(B,)``); the caller averages over the pairs of
the optimizer step. :func:`pair_scores` adds the rewards the metrics report: ``beta * logratio`` for
DPO (the implicit reward of the DPO paper), ``beta`` (SimPO) or ``lambda`` (ORPO) times the average
log-prob for the reference-free objectives, as TRL reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_lora.config.schema import ObjectiveConfig


def dpo_sigmoid(
    logratio_w: torch.Tensor, logratio_l: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, eq. 7), with conservative DPO's label smoothing ``eps``::

    delta = logratio_w - logratio_l
    L = -(1 - eps) * log sigma(beta * delta) - eps * log sigma(-beta * delta)
    """
    z = beta * (logratio_w - logratio_l)
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def dpo_ipo(
    logratio_w: torch.Tensor,
    logratio_l: torch.Tensor,
    tokens_w: torch.Tensor,
    tokens_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al., 2023, eq. 17), ``beta`` in the role of the paper's ``tau``::

        L = (logratio_w / |y_w| - logratio_l / |y_l| - 1 / (2 * beta)) ** 2

    The log-ratios are averaged per answer token, as TRL does (normalisation confirmed by the IPO
    authors there): summed, the squared loss would grow with the answers' length.
    """
    delta = logratio_w / tokens_w.clamp(min=1) - logratio_l / tokens_l.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def dpo_hinge(logratio_w: torch.Tensor, logratio_l: torch.Tensor, beta: float) -> torch.Tensor:
    """The hinge loss of SLiC (Zhao et al., 2023) on DPO's log-ratios::

    L = max(0, 1 - beta * (logratio_w - logratio_l))
    """
    return torch.relu(1 - beta * (logratio_w - logratio_l))


def simpo(
    logps_w: torch.Tensor,
    logps_l: torch.Tensor,
    tokens_w: torch.Tensor,
    tokens_l: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (Meng et al., 2024, eq. 6): reference-free, length-normalised, with a target margin::

    L = -log sigma(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)
    """
    z = beta * (logps_w / tokens_w.clamp(min=1) - logps_l / tokens_l.clamp(min=1)) - gamma
    return -F.logsigmoid(z)


def orpo(
    logps_w: torch.Tensor,
    logps_l: torch.Tensor,
    tokens_w: torch.Tensor,
    tokens_l: torch.Tensor,
    lambda_: float,
) -> torch.Tensor:
    """ORPO (Hong et al., 2024, eqs. 2-7), reference-free. With ``P(y|x) = exp(log pi(y|x) / |y|)`` (the
    length-averaged likelihood) and ``odds(y|x) = P / (1 - P)``::

        L = -log pi(y_w|x) / |y_w|  -  lambda * log sigma(log odds(y_w|x) - log odds(y_l|x))

    The first term, the chosen answer's NLL, is averaged per token of each pair, as in the paper
    (TRL averages it over all chosen tokens of the batch, which differs when lengths differ); a mean of
    per-pair losses keeps gradient accumulation exact.
    """
    avg_w = logps_w / tokens_w.clamp(min=1)
    avg_l = logps_l / tokens_l.clamp(min=1)
    # log(1 - P) = log1p(-exp(avg)); avg < 0 always (a log-prob of a token is below 0).
    log_odds = (avg_w - avg_l) - (torch.log1p(-torch.exp(avg_w)) - torch.log1p(-torch.exp(avg_l)))
    return chosen_nll(logps_w, tokens_w) - lambda_ * F.logsigmoid(log_odds)


def chosen_nll(logps_w: torch.Tensor, tokens_w: torch.Tensor) -> torch.Tensor:
    """The chosen answer's negative log-likelihood per token of each pair, ``-log pi(y_w|x) / |y_w|``:
    the term RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", eq. 1) adds to DPO
    with weight ``alpha`` (``objective.rpo_alpha``; TRL's ``rpo_alpha``, which averages it over all chosen
    tokens of the batch instead). It keeps the chosen answers likely while DPO widens the margin: DPO
    alone may lower both sides' likelihood, and with it what the model generates."""
    return -logps_w / tokens_w.clamp(min=1)


@dataclass
class PairScores:
    """Per pair: the loss, the rewards of each side and the summed log-probs of each side (both
    detached), shape ``(B,)`` each."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    logps: tuple[torch.Tensor, torch.Tensor]


def pair_scores(
    cfg: ObjectiveConfig,
    logps: tuple[torch.Tensor, torch.Tensor],
    tokens: tuple[torch.Tensor, torch.Tensor],
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PairScores:
    """The loss of ``cfg``'s objective for each pair, from summed answer log-probs ``(chosen, rejected)``,
    their token counts, and (DPO only) the reference's summed log-probs."""
    (lw, ll), (n_w, n_l) = logps, tokens
    detached = (lw.detach(), ll.detach())
    if cfg.name == "dpo":
        if ref_logps is None:
            raise ValueError("objective=dpo needs the reference log-probs")
        ratio_w, ratio_l = lw - ref_logps[0], ll - ref_logps[1]
        if cfg.loss == "sigmoid":
            loss = dpo_sigmoid(ratio_w, ratio_l, cfg.beta, cfg.label_smoothing)
        elif cfg.loss == "ipo":
            loss = dpo_ipo(ratio_w, ratio_l, n_w, n_l, cfg.beta)
        else:
            loss = dpo_hinge(ratio_w, ratio_l, cfg.beta)
        if cfg.rpo_alpha:
            loss = loss + cfg.rpo_alpha * chosen_nll(lw, n_w)
        return PairScores(loss, cfg.beta * ratio_w.detach(), cfg.beta * ratio_l.detach(), detached)
    avg_w, avg_l = lw.detach() / n_w.clamp(min=1), ll.detach() / n_l.clamp(min=1)
    if cfg.name == "simpo":
        loss = simpo(lw, ll, n_w, n_l, cfg.beta, cfg.gamma)
        return PairScores(loss, cfg.beta * avg_w, cfg.beta * avg_l, detached)
    if cfg.name == "orpo":
        loss = orpo(lw, ll, n_w, n_l, cfg.lambda_)
        return PairScores(loss, cfg.lambda_ * avg_w, cfg.lambda_ * avg_l, detached)
    raise ValueError(f"objective={cfg.name} is not a preference objective")
