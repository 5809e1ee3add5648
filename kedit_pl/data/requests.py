"""The one normalized edit request every reader produces and every method consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

from kedit_pl.errors import InvalidRecord


@dataclass(frozen=True)
class EditRequest:
    """An edit `(subject, relation prompt, target_true -> target_new)` plus its evaluation prompts.

    `prompt` is a template with exactly one `{}` where the subject goes. Targets are stored without a
    leading space; tokenization adds the separating space (see `kedit_pl.tokens`).
    Paraphrase and neighborhood prompts are complete strings (subject already filled in).
    """
    #: fields that a metric group may require (see `kedit_pl.eval.groups`)
    PROBE_FIELDS = ("generation_prompts", "portability", "distracting_neighborhood", "alternative_subject")

    case_id: str
    subject: str
    prompt: str
    target_true: str
    target_new: str
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    loc: str | None = None
    loc_ans: str | None = None
    relation_id: str | None = None
    # probes of the extra metric groups (kedit_pl/eval/groups); empty where a file does not carry them
    generation_prompts: tuple[str, ...] = ()            # fluency: greedy generations from these
    portability: tuple[tuple[str, str], ...] = ()       # one-hop (question, answer) pairs the edit implies
    distracting_neighborhood: tuple[str, ...] = ()      # neighborhood prompts with the edited fact stated first
    alternative_subject: str | None = None              # another name of the subject (efficacy under an alias)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def rewrite(self) -> str:
        """The relation prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def validate(self) -> "EditRequest":
        """Raise `InvalidRecord` naming the case and field if the request cannot be edited faithfully."""
        def bad(fld: str, why: str) -> InvalidRecord:
            return InvalidRecord(f"record case_id={self.case_id}: field '{fld}' {why}")

        if not self.subject or not self.subject.strip():
            raise bad("subject", "is empty")
        if self.prompt.count("{}") != 1:
            raise bad("prompt", f"must contain exactly one '{{}}' for the subject, got {self.prompt!r}")
        if self.prompt.rstrip().endswith("{}"):
            raise bad("prompt", f"ends with the subject; the target must follow a relation: {self.prompt!r}")
        for name in ("target_new", "target_true"):
            if not getattr(self, name).strip():
                raise bad(name, "is empty")
        if self.target_new.strip() == self.target_true.strip():
            raise bad("target_new", f"equals target_true ({self.target_new!r}); there is nothing to edit")
        return self


def normalize_target(text: str) -> str:
    """Targets are stored stripped; the tokenizer helpers add the separating space."""
    return (text or "").strip()
