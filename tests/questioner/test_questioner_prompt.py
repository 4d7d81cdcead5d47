import json

import pytest

from unigen.questioner import PairFilter, PromptTemplate, UsageError, judge_generation
from unigen.questioner.prompt import PAPER_INSTRUCTION, Example


def test_render_has_instruction_examples_and_open_question():
    template = PromptTemplate()
    prompt = template.render("  a cat   sleeps on a sofa. ")
    lines = prompt.split("\n")
    assert lines[0] == PAPER_INSTRUCTION
    # The paper's own example comes first, in the paper's tag order.
    assert lines[1] == (
        "<sentence> a worker sits on a bench in front of a group of young people. "
        "<question> What is the worker in front of? <answer> young people."
    )
    assert len(lines) == 1 + len(template.examples) + 1
    assert lines[-1] == "<sentence> a cat   sleeps on a sofa. <question>"


def test_default_examples_pass_our_own_filters():
    # The model must never be shown an example the filter would throw away.
    for ex in PromptTemplate().examples:
        result = judge_generation(ex.sentence, f" {ex.question} <answer> {ex.answer}", PairFilter(), max_pairs=1)
        assert result.pairs == [(ex.question, ex.answer)], (ex, result.rejected)


def test_template_from_yaml_and_json(tmp_path):
    data = {
        "version": "mine-v2",
        "instruction": "Ask about the sentence.",
        "examples": [{"sentence": "a red kite.", "question": "What color is the kite?", "answer": "red"}],
    }
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.yaml").write_text(
        "version: mine-v2\ninstruction: Ask about the sentence.\nexamples:\n"
        '  - {sentence: "a red kite.", question: "What color is the kite?", answer: red}\n'
    )
    for name in ("p.json", "p.yaml"):
        t = PromptTemplate.from_file(tmp_path / name)
        assert t.version == "mine-v2"
        assert t.render("x") == (
            "Ask about the sentence.\n<sentence> a red kite. <question> What color is the kite? <answer> red\n"
            "<sentence> x <question>"
        )
        assert PromptTemplate.from_dict(t.to_dict()) == t


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid"),
        ('{"version": "v", "extra": 1}', "unknown field"),
        ('{"examples": [{"sentence": "s"}]}', "exactly the fields"),
        ('{"examples": [{"sentence": "s <answer>", "question": "q?", "answer": "s"}]}', "must not contain a tag"),
        ('{"instruction": ""}', "instruction"),
    ],
)
def test_bad_template_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        PromptTemplate.from_file(path)
    assert "--prompt" in str(info.value) and "bad.json" in str(info.value)


def test_missing_template_file(tmp_path):
    with pytest.raises(UsageError, match="--prompt: cannot read .*nope.yaml"):
        PromptTemplate.from_file(tmp_path / "nope.yaml")


def test_example_rejects_empty_fields():
    with pytest.raises(UsageError, match="answer"):
        Example("a sentence.", "What?", "  ")
