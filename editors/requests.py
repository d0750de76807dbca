"""The edit request: what an editor is asked to change. A leaf module (imports nothing of ours)."""

from __future__ import annotations

from dataclasses import dataclass

SUBJECT_SLOT = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One requested rewrite ``(subject, relation) : target_true -> target_new``.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes, e.g.
    ``"The mother tongue of {} is"``. ``subject`` None: no subject span (an unlearning question):
    ``prompt`` is then the whole prompt, without ``{}``, and editors read and write at its last
    token. Targets are stored without a leading space; editors add one where the method does
    (the reference code prepends a space to ``target_new`` only). ``target_true`` None: no old
    object (zsRE); editors use the tokenizer's EOS.
    """

    case_id: str
    prompt: str
    subject: str | None
    target_new: str
    target_true: str | None

    def __post_init__(self) -> None:
        if self.subject is None:
            if SUBJECT_SLOT in self.prompt:
                raise ValueError(
                    f"case {self.case_id}: a request without a subject takes the whole prompt, "
                    f"without '{{}}', got {self.prompt!r}"
                )
            if not self.prompt.strip():
                raise ValueError(f"case {self.case_id}: empty prompt")
        elif self.prompt.count(SUBJECT_SLOT) != 1:
            raise ValueError(
                f"case {self.case_id}: prompt template must contain exactly one '{{}}' "
                f"for the subject, got {self.prompt!r}"
            )
        elif not self.subject.strip():
            raise ValueError(f"case {self.case_id}: empty subject")
        if not self.target_new.strip():
            raise ValueError(f"case {self.case_id}: empty target_new")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (the prompt itself when there is no subject)."""
        return self.prompt if self.subject is None else fill(self.prompt, self.subject)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into the single ``{}`` of ``template`` (no other brace is interpreted)."""
    return template.replace(SUBJECT_SLOT, subject, 1)
