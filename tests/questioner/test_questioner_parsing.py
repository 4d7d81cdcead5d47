"""The parser and the filters on well-formed, malformed, hallucinated, yes/no and duplicate output."""

import pytest

from unigen.questioner import PairFilter, judge_generation, normalize_tokens, parse_generation
from unigen.questioner import filters as F
from unigen.questioner.parsing import EMPTY_GENERATION, MALFORMED

CAPTION = "A worker sits on a bench in front of a group of young people."


def judge(generation, max_pairs=3, **kw):
    return judge_generation(CAPTION, generation, PairFilter(**kw), max_pairs)


def test_well_formed_generation():
    r = judge(" What is the worker in front of? <answer> young people.\n<sentence> a cat on a mat. <question> x")
    assert r.pairs == [("What is the worker in front of?", "young people.")]
    assert sum(r.rejected.values()) == 0


def test_repeated_question_tag_and_several_pairs():
    r = judge("<question> What does the worker sit on? <answer> a bench "
              "<question> Who sits on a bench? <answer> A Worker")
    assert r.pairs == [("What does the worker sit on?", "a bench"), ("Who sits on a bench?", "A Worker")]


def test_text_after_the_answer_line_is_not_part_of_the_answer():
    r = judge(" What does the worker sit on? <answer> a bench\nThe weather was nice that day.")
    assert r.pairs == [("What does the worker sit on?", "a bench")]


@pytest.mark.parametrize(
    "generation, reason",
    [
        ("", EMPTY_GENERATION),
        ("   \n ", EMPTY_GENERATION),
        (None, EMPTY_GENERATION),
        ("<sentence> another caption <question> q? <answer> a", EMPTY_GENERATION),
        ("What is the worker in front of?", MALFORMED),  # cut off before the answer
        ("<answer> young people", MALFORMED),  # answer without question
        ("What is the\nworker in front of? <answer> young people", MALFORMED),  # question over two lines
        ("<question><answer> young people", F.EMPTY),  # a pair in form, but its question is empty
    ],
)
def test_broken_generations_are_rejected_not_guessed(generation, reason):
    r = judge(generation)
    assert r.pairs == []
    assert r.rejected[reason] >= 1


def test_trailing_unanswered_question_is_counted_but_pair_kept():
    r = judge(" What is the worker in front of? <answer> young people <question> Where is the")
    assert r.pairs == [("What is the worker in front of?", "young people")]
    assert r.rejected == {MALFORMED: 1}


@pytest.mark.parametrize(
    "question, answer, reason",
    [
        ("What is the worker in front of?", "a group of old people", F.NOT_IN_CAPTION),  # hallucinated
        ("What is the worker in front of?", "people young", F.NOT_IN_CAPTION),  # not contiguous
        ("What is the worker in front of?", "young peop", F.NOT_IN_CAPTION),  # not whole words
        ("Is the worker sitting?", "yes", F.YES_NO),
        ("Does the worker sit on a bench?", "sits", F.YES_NO),  # polar question, span answer
        ("What does the worker do?", "No.", F.YES_NO),
        ("What is the worker in front of", "young people", F.NOT_A_QUESTION),
        ("?", "young people", F.EMPTY),
        ("What is the worker in front of?", "", F.EMPTY),
        ("What is the worker in front of?", "the", F.EMPTY),  # only an article
        ("What is in front of the young people?", "young people", F.QUESTION_CONTAINS_ANSWER),
        ("What is the worker in front of?", "bench in front of a group of", F.ANSWER_TOO_LONG),
        ("What " + "very " * 40 + "is it?", "young people", F.QUESTION_TOO_LONG),
    ],
)
def test_each_filter_rule(question, answer, reason):
    r = judge(f" {question} <answer> {answer}")
    assert r.pairs == []
    assert dict(r.rejected) == {reason: 1}


def test_alternative_question_is_not_yes_no_but_gives_its_answer_away():
    r = judge(" Is the worker sitting on a bench or a chair? <answer> bench")
    assert dict(r.rejected) == {F.QUESTION_CONTAINS_ANSWER: 1}


def test_answer_span_is_case_and_punctuation_normalised():
    caption = "Actor Tom-Smith attends the premiere of 'Big Night'."
    r = judge_generation(caption, " Which premiere does the actor attend? <answer> big night", PairFilter(), 1)
    assert r.pairs == [("Which premiere does the actor attend?", "big night")]
    r = judge_generation(caption, " Who attends the premiere? <answer> actor tom smith", PairFilter(), 1)
    assert r.pairs == [("Who attends the premiere?", "actor tom smith")]
    assert normalize_tokens("Tom-Smith's  CAFÉ!") == ["tom", "smith", "s", "café"]


def test_duplicates_dropped_after_normalisation():
    gen = (
        " What is the worker in front of? <answer> young people"
        " <question> what is the worker in front of <answer> Young people."  # no '?': not a question
        " <question> What is the worker in front of ? <answer> young people."
    )
    r = judge(gen)
    assert r.pairs == [("What is the worker in front of?", "young people")]
    assert dict(r.rejected) == {F.NOT_A_QUESTION: 1, F.DUPLICATE: 1}


def test_max_pairs_keeps_the_first_valid_ones():
    gen = (
        " What does the worker sit on? <answer> bench <question> Who sits on the bench? <answer> worker"
        " <question> What is the worker in front of? <answer> young people"
    )
    r = judge(gen, max_pairs=2)
    assert [a for _, a in r.pairs] == ["bench", "worker"]
    assert dict(r.rejected) == {F.OVER_MAX_PAIRS: 1}


def test_answer_length_threshold_is_configurable():
    gen = " What is the worker in front of? <answer> a group of young people"
    assert judge(gen, max_answer_words=4).rejected == {F.ANSWER_TOO_LONG: 1}
    assert judge(gen, max_answer_words=5).pairs


def test_parse_generation_reports_pairs_and_rejections():
    p = parse_generation("q1? <answer> a1 <answer> stray")
    assert p.pairs == [("q1?", "a1")]
    assert p.rejected == [MALFORMED]


def test_filter_thresholds_are_validated():
    with pytest.raises(F.UsageError, match="--max-answer-words"):
        PairFilter(max_answer_words=0)


def test_kept_pairs_have_single_spaced_text():
    r = judge(" What  is the worker\u2028in front of? <answer>  young\tpeople ")
    assert r.pairs == [("What is the worker in front of?", "young people")]
