"""The questioner prompt of UniGen §3.2, as a versioned few-shot template.

The paper prompts an offline LLM (Llama-30B) with an instruction carrying its three rules
(extract important information, answer exactly from the sentence, no yes/no answers) followed by
in-context examples of the form ``<sentence> … <question> … <answer> …``. The rendered prompt ends
with ``<sentence> {caption} <question>`` so the model's continuation starts with the question;
generation stops at the next ``<sentence>`` tag (the model starting a new example).

The template is data, not code: ``PromptTemplate.from_file`` reads a YAML or JSON file with the
same fields, so instruction and examples can change without touching the tool. ``version`` is
recorded in the run summary so every CCQA file says which prompt produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

SENTENCE_TAG = "<sentence>"
QUESTION_TAG = "<question>"
ANSWER_TAG = "<answer>"
TAGS = (SENTENCE_TAG, QUESTION_TAG, ANSWER_TAG)

# The instruction is the paper's, word for word (§3.2); emphasis marks are dropped because they
# were typesetting, not prompt text.
PAPER_INSTRUCTION = (
    "Extract accurate and important information to form a question-answer pair exactly from the "
    "sentence following the pattern, avoid using yes/no answers:"
)


@dataclass(frozen=True)
class Example:
    """One in-context example: a caption and a question–answer pair taken from it."""

    sentence: str
    question: str
    answer: str

    def __post_init__(self):
        for name in ("sentence", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"prompt example field {name!r} must be a non-empty string")
            if any(tag in value for tag in TAGS):
                raise UsageError(f"prompt example field {name!r} must not contain a tag: {value!r}")


# The first example is the one printed in the paper. The others are ours; each follows the three
# rules and passes the tool's own filters (a test checks that), so the model is never shown a
# pattern the filter would reject. They cover the question kinds CC3M captions support best:
# relation, count, colour, what-is-doing.
PAPER_EXAMPLES = (
    Example(
        "a worker sits on a bench in front of a group of young people.",
        "What is the worker in front of?",
        "young people.",
    ),
    Example(
        "two dogs running through the snow in a park.",
        "How many dogs are running through the snow?",
        "two",
    ),
    Example(
        "a woman in a red dress holds an umbrella on a rainy street.",
        "What color is the woman's dress?",
        "red",
    ),
    Example(
        "aerial view of a small village surrounded by green hills.",
        "What surrounds the small village?",
        "green hills.",
    ),
)


@dataclass(frozen=True)
class PromptTemplate:
    """Instruction + few-shot examples; ``render(caption)`` builds one prompt."""

    version: str = "ccqa-v1"
    instruction: str = PAPER_INSTRUCTION
    examples: tuple[Example, ...] = field(default=PAPER_EXAMPLES)

    def __post_init__(self):
        if not isinstance(self.version, str) or not self.version.strip():
            raise UsageError("prompt 'version' must be a non-empty string")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise UsageError("prompt 'instruction' must be a non-empty string")
        if any(tag in self.instruction for tag in TAGS):
            raise UsageError("prompt 'instruction' must not contain the <sentence>/<question>/<answer> tags")
        examples = tuple(self.examples)
        if not all(isinstance(e, Example) for e in examples):
            raise UsageError("prompt 'examples' must be Example objects")
        object.__setattr__(self, "examples", examples)

    def render(self, caption: str) -> str:
        # One example per line: the paper writes them inline, but a line break before each
        # <sentence> makes the stop tag easier for small models to produce and changes nothing else.
        lines = [self.instruction.strip()]
        for ex in self.examples:
            lines.append(
                f"{SENTENCE_TAG} {ex.sentence.strip()} {QUESTION_TAG} {ex.question.strip()} "
                f"{ANSWER_TAG} {ex.answer.strip()}"
            )
        lines.append(f"{SENTENCE_TAG} {caption.strip()} {QUESTION_TAG}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "instruction": self.instruction,
            "examples": [
                {"sentence": e.sentence, "question": e.question, "answer": e.answer} for e in self.examples
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "prompt") -> "PromptTemplate":
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a mapping with version/instruction/examples")
        unknown = set(data) - {"version", "instruction", "examples"}
        if unknown:
            raise UsageError(f"{source}: unknown field(s) {sorted(unknown)}")
        kwargs = {}
        if "version" in data:
            kwargs["version"] = data["version"]
        if "instruction" in data:
            kwargs["instruction"] = data["instruction"]
        if "examples" in data:
            raw = data["examples"]
            if not isinstance(raw, list):
                raise UsageError(f"{source}: 'examples' must be a list")
            examples = []
            for i, item in enumerate(raw):
                if not isinstance(item, dict) or set(item) != {"sentence", "question", "answer"}:
                    raise UsageError(
                        f"{source}: example {i} must have exactly the fields sentence, question, answer"
                    )
                try:
                    examples.append(Example(**item))
                except UsageError as exc:
                    raise UsageError(f"{source}: example {i}: {exc}") from None
            kwargs["examples"] = tuple(examples)
        try:
            return cls(**kwargs)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptTemplate":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--prompt: cannot read {path}: {exc.strerror or exc}") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml and json raise different types; both mean a bad file
            raise UsageError(f"--prompt: {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        return cls.from_dict(data, source=f"--prompt {path}")
