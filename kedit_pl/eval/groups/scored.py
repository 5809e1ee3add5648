"""Groups that score prompts against targets with the shared scorer (`eval/scoring.py`): the same mean-token
NLL and teacher-forced accuracy as ES/PS/NS, on other probes.

- portability (EasyEdit's one hop, Yao et al. 2023): the `New Question` with its `New Answer`.
  `port_acc` = teacher-forced token accuracy of the answer (EasyEdit's portability metric); `port_p_new` = its
  mean-token probability exp(-mean NLL); `port_rise` (post only) = share of questions whose answer became more
  likely than on the unedited model. The files carry no old answer to a New Question (its old-world answer
  would need a fact about the true object that the data lacks), so P(new) > P(old) cannot be formed honestly;
  the paired rise is the success rate reported instead.
- distracting neighborhood (EasyEdit's CounterFact-plus): NS (P(true) > P(new)) on neighborhood prompts that
  state the edited fact first ("Spike Hughes originates from Philadelphia. Max Mosley originates from").
- subject aliases: ES (P(new) > P(true)) on the rewrite prompt with `alternative_subject` as the subject.
"""
from __future__ import annotations

import math
from statistics import mean

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.groups.base import MetricGroup
from kedit_pl.eval.metrics import magnitude, success_rate
from kedit_pl.eval.scoring import score_pairs
from kedit_pl.tokens import target_ids


class ScoredGroup(MetricGroup):
    """Score `pairs(req)` = [(kind, prompt, target)]; raw = {kind: [{"nll", "acc"}, ...]} in prompt order."""

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str]]:
        """The `(kind, prompt, target)` pairs to score for one record; kind is `new` or `true`."""
        raise NotImplementedError

    def measure(self, method, requests: list[EditRequest]) -> list[dict]:
        items = [(r_i, kind, p, t) for r_i, r in enumerate(requests) for kind, p, t in self.pairs(r)]
        scores = score_pairs(method.logits_fn(), method.tok, [p for _, _, p, _ in items], [t for *_, t in items],
                             int(self.settings.get("batch_size", 64)), method.device)
        out: list[dict] = [{} for _ in requests]
        for (r_i, kind, _, _), sc in zip(items, scores):
            out[r_i].setdefault(kind, []).append({"nll": sc.nll, "acc": sc.acc})
        return out


def _nll(raw: dict, kind: str) -> list[float]:
    return [s["nll"] for s in raw[kind]]


class Portability(ScoredGroup):
    """One-hop portability: does the edited fact carry to a question whose answer follows from it?"""
    name = "portability"
    fields = ("portability",)

    def problem(self, req: EditRequest, tok) -> str | None:
        if (why := super().problem(req, tok)) is not None:
            return why
        for _, answer in req.portability:
            try:
                if not answer.strip():
                    raise ValueError(answer)
                target_ids(tok, answer)
            except ValueError:
                return f"New Answer {answer!r} tokenizes to nothing"
        return None

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str]]:
        """Each one-hop question with its new answer."""
        return [("new", q, a) for q, a in req.portability]

    @staticmethod
    def numbers(raw: dict) -> dict[str, float]:
        return {"port_acc": 100.0 * mean(s["acc"] for s in raw["new"]),
                "port_p_new": 100.0 * mean(math.exp(-s["nll"]) for s in raw["new"])}

    @staticmethod
    def paired(pre: dict, post: dict) -> dict[str, float]:
        return {"port_rise": 100.0 * success_rate(_nll(post, "new"), _nll(pre, "new"))}


class DistractingNeighborhood(ScoredGroup):
    """Neighborhood success with the edited fact stated before each neighbour's prompt."""
    name = "distracting"
    fields = ("distracting_neighborhood",)

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str]]:
        """Each distracting prompt with the true and the new object."""
        return [(k, p, t) for p in req.distracting_neighborhood for k, t in (("true", req.target_true),
                                                                           ("new", req.target_new))]

    @staticmethod
    def numbers(raw: dict) -> dict[str, float]:
        return {"dn_ns": 100.0 * success_rate(_nll(raw, "true"), _nll(raw, "new")),
                "dn_nm": 100.0 * magnitude(_nll(raw, "true"), _nll(raw, "new"))}


class SubjectAlias(ScoredGroup):
    """Efficacy on the subject's other name (the rewrite prompt with the alias as subject)."""
    name = "alias"
    fields = ("alternative_subject",)

    def pairs(self, req: EditRequest) -> list[tuple[str, str, str]]:
        """The rewrite prompt about the alias, with the new and the true object."""
        prompt = req.prompt.format(req.alternative_subject)
        return [("new", prompt, req.target_new), ("true", prompt, req.target_true)]

    @staticmethod
    def numbers(raw: dict) -> dict[str, float]:
        return {"alias_es": 100.0 * success_rate(_nll(raw, "new"), _nll(raw, "true")),
                "alias_em": 100.0 * magnitude(_nll(raw, "new"), _nll(raw, "true"))}
