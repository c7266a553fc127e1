"""The InfiniteBench and LongBench scorers on hand-checked examples (the arithmetic is in the
comments), the official code's quirks included, and the task -> metric dispatch."""

import pytest

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval import first_int, metrics, score_passkey
from infllm_lite.eval.metrics import METRICS, first_line, score

INFINITEBENCH = ["passkey", "number_string", "kv_retrieval", "longbook_choice_eng",
                 "longbook_qa_eng", "longbook_sum_eng", "math_find", "code_debug",
                 "longdialogue_qa_eng"]
LONGBENCH = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
             "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count",
             "passage_retrieval_en", "lcc", "repobench-p"]


def test_metrics_cover_exactly_the_tasks_and_name_functions():
    assert sorted(METRICS) == sorted(INFINITEBENCH + LONGBENCH)
    for name in set(METRICS.values()):
        assert callable(getattr(metrics, name))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(InfLLMLiteError, match="no metric for task 'lsht'.*passkey.*repobench-p"):
        score("lsht", "x", ["x"])


def test_answers_must_be_a_sequence_not_a_string():
    with pytest.raises(InfLLMLiteError, match="sequence of references"):
        score("passkey", "71432", "71432")


def test_first_line_and_first_int():
    assert first_line("\n\nLocation\nNumber of something") == "Location"
    assert first_line(" Location\n") == " Location"  # only newlines are stripped
    assert first_line("") == ""
    assert first_int("The pass key is 71432. Remember it.") == "71432"
    assert first_int("x3.5") == "3"
    assert first_int("no digits") == ""
    # the passkey module uses the same rule
    assert first_int is metrics.first_int
    assert score_passkey("It is 71432.", "71432") and not score_passkey("It is 7143.", "71432")


# ---------------------------------------------------------------- LongBench


def test_qa_f1_normalisation():
    # "the cat sat on the mat." -> cat sat on mat (4); "a cat on a mat" -> cat on mat (3);
    # 3 shared: P = 3/4, R = 3/3, F1 = 2·(3/4)/(7/4) = 6/7
    assert score("narrativeqa", "The cat sat on the mat.", ["a cat on a mat"]) \
        == pytest.approx(6 / 7)
    # "paris france capital" vs "city of paris france": 2 shared, P = 2/3, R = 2/4,
    # F1 = 2·(2/3)(1/2)/(2/3 + 1/2) = (2/3)/(7/6) = 4/7
    assert score("qasper", "Paris,  FRANCE\tcapital", ["The city of Paris, France"]) \
        == pytest.approx(4 / 7)
    assert score("musique", "U.S.A.", ["USA"]) == 1.0  # punctuation is deleted, not spaced
    assert score("musique", "another theme", ["another theme"]) == 1.0  # whole words only
    assert score("musique", "an other", ["another"]) == 0.0
    assert score("musique", "\u201cParis\u201d", ["Paris"]) == 0.0  # ASCII punctuation only
    assert score("hotpotqa", "", ["Paris"]) == 0.0
    assert score("hotpotqa", "The a an", ["the"]) == 0.0  # both normalise to nothing


def test_qa_f1_takes_the_best_reference():
    # "barack obama" vs "obama": P = 1/2, R = 1, F1 = 2/3;
    # vs "president obama of usa": P = 1/2, R = 1/4, F1 = (1/4)/(3/4) = 1/3
    assert score("2wikimqa", "Barack Obama", ["Obama", "President Obama of USA"]) \
        == pytest.approx(2 / 3)
    assert score("triviaqa", "Barack Obama", ["Michelle", "barack obama"]) == 1.0
    assert score("triviaqa", "anything", []) == 0.0


def test_rouge_l():
    pytest.importorskip("rouge")  # the eval extra
    # one sentence each, distinct words: LCS(cat sat on mat, cat lay on a mat) = cat on mat = 3;
    # R = 3/5, P = 3/4, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    assert score("gov_report", "cat sat on mat", ["cat lay on a mat"]) \
        == pytest.approx(2 / 3, abs=1e-6)
    # case-sensitive: "Cat" != "cat", LCS = on mat = 2; R = 2/5, P = 2/4, F = 0.4/0.9 = 4/9
    assert score("qmsum", "Cat sat on mat", ["cat lay on a mat"]) == pytest.approx(4 / 9, abs=1e-6)
    # sentences split at ".": union LCS of the reference with "on mat" and "cat sat" covers
    # all 4 words, so P = R = 1 (one unsplit sentence would have LCS 2)
    assert score("multi_news", "on mat. cat sat", ["cat sat on mat"]) \
        == pytest.approx(1.0, abs=1e-6)
    # the package raises on a text without words; LongBench scores 0
    assert score("samsum", "", ["cat sat"]) == 0.0
    assert score("samsum", "...", ["cat sat"]) == 0.0
    assert score("samsum", "cat sat", ["dog ran", "cat sat"]) == pytest.approx(1.0, abs=1e-6)


CLASSES = ["Other", "Other entity", "Animal", "Description of something"]


def test_classification_substring_class_names():
    # found: Other, Other entity; "Other" is part of the reference and is dropped -> 1/1
    assert score("trec", "Other entity", ["Other entity"], all_classes=CLASSES) == 1.0
    # reference "Other": "Other entity" is not part of it, both stay -> 1/2
    assert score("trec", "Other entity", ["Other"], all_classes=CLASSES) == 0.5
    # found: Other, Other entity, Animal; none is part of "Animal" -> 1/3
    assert score("trec", "Animal or Other entity", ["Animal"], all_classes=CLASSES) \
        == pytest.approx(1 / 3)
    # no class name in the prediction: 0 (LongBench's difflib fallback is unreachable)
    assert score("trec", "Descriptions", ["Description of something"], all_classes=CLASSES) == 0.0


def test_classification_keeps_the_skip_of_removing_while_iterating():
    # found: Other, the, Other entity (all in the prediction, in class order). Removing "Other"
    # makes the loop skip "the", which stays: [the, Other entity] -> 1/2 (not 1)
    classes = ["Other", "the", "Other entity"]
    assert score("trec", "Other entity", ["Other entity"], all_classes=classes) == 0.5


def test_classification_needs_all_classes():
    with pytest.raises(InfLLMLiteError, match="all_classes"):
        score("trec", "Animal", ["Animal"])


def test_retrieval_reads_the_paragraph_number():
    assert score("passage_retrieval_en", "Paragraph 12", ["Paragraph 12"]) == 1.0
    assert score("passage_retrieval_en", "paragraph 1", ["Paragraph 12"]) == 0.0  # 1 != 12
    # numbers 1 and 12, one right -> 1/2; numbers 12 and 120 -> 1/2
    assert score("passage_retrieval_en", "Paragraph 1 or Paragraph 12", ["Paragraph 12"]) == 0.5
    assert score("passage_retrieval_en", "Paragraph 12, not 120", ["Paragraph 12"]) == 0.5
    assert score("passage_retrieval_en", "I don't know", ["Paragraph 12"]) == 0.0
    with pytest.raises(InfLLMLiteError, match="Paragraph N"):  # the pattern is case-sensitive
        score("passage_retrieval_en", "12", ["paragraph 12"])


def test_count_shares_the_right_number():
    assert score("passage_count", "There are 7 unique paragraphs.", ["7"]) == 1.0
    assert score("passage_count", "7 or 8, maybe 7", ["7"]) == pytest.approx(2 / 3)  # 7, 8, 7
    assert score("passage_count", "17", ["7"]) == 0.0  # whole numbers
    assert score("passage_count", "seven", ["7"]) == 0.0


def test_code_sim_first_line_without_comment_marks():
    assert score("lcc", "\n# set up\nx = foo(1)\ny = 2", ["x = foo(1)"]) == 1.0
    # a "#" anywhere in the line skips it, not just at its start
    assert score("lcc", "x = 1  # one\ny = 2", ["y = 2"]) == 1.0
    # "```python" and "a // b" are skipped; "return a" vs "return a / b": one block of 8
    # matching characters, 2·8/(8 + 12) = 0.8
    assert score("repobench-p", "```python\nreturn a // b\nreturn a", ["return a / b"]) == 0.8
    assert score("repobench-p", "# only\n// comments", ["x = 1"]) == 0.0  # "" vs the line
    # fuzzywuzzy rounds to an integer percent: "abc" vs "abd", 2·2/6 = 66.7 -> 67
    assert score("lcc", "abc", ["abd"]) == 0.67
    # difflib's greedy blocks, not the optimal LCS: the first longest match ("a" at 0 / 2)
    # leaves nothing on either side, 2·1/6 -> 33 (python-Levenshtein/rapidfuzz: 67)
    assert score("lcc", "aba", ["bca"]) == 0.33
    assert score("lcc", "", [""]) == 1.0  # fuzzywuzzy: equal strings are 100


# ---------------------------------------------------------------- InfiniteBench


def test_first_int_match():
    assert score("passkey", "The pass key is 71432.", ["71432"]) == 1.0
    assert score("passkey", "The pass key is 071432.", ["71432"]) == 0.0  # compared as text
    assert score("passkey", "I think 1234, no, 71432", ["71432"]) == 0.0  # only the first
    assert score("number_string", "No digits here.", ["1234567890"]) == 0.0
    assert score("number_string", "", ["1234567890"]) == 0.0


def test_kv_retrieval_words_after_blanking_punctuation():
    value = "2e5b7c1a-1f3d-4c2b-9a8e-5f6d7c8b9a0e"
    assert score("kv_retrieval", f'The value is "{value}".', [value]) == 1.0
    assert score("kv_retrieval", f"value:{value}", [value]) == 1.0  # ":" is blanked
    assert score("kv_retrieval", f"({value})", [value]) == 0.0  # parentheses are not
    assert score("kv_retrieval", f"x{value}", [value]) == 0.0  # a word, not a substring


def test_math_find_first_number():
    assert score("math_find", "The answer is 42.", ["42"]) == 1.0  # "42." is no decimal
    assert score("math_find", "It is 7, then 42", ["42"]) == 0.0
    assert score("math_find", "42", ["42.0"]) == 1.0  # a float label: 42.0 == 42.0
    assert score("math_find", "2.50", ["2.5"]) == 1.0
    assert score("math_find", "42.0", ["42"]) == 0.0  # official: int("42.0") raises
    assert score("math_find", "-5", ["-5"]) == 0.0  # the sign is never read
    assert score("math_find", "none", ["42"]) == 0.0
    with pytest.raises(InfLLMLiteError, match="number"):
        score("math_find", "42", ["forty-two"])


OPTION = ["Walking Georgie", "B"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", 1.0),
    (" \nB. Walking Georgie", 1.0),  # stripped, then the first character
    ("A", 0.0),
    ("Answer is B", 0.0),  # the first character "A" decides
    ("Walking Georgie", 1.0),  # the option text itself
    ("The answer is B", 1.0),  # "answer is" + one character
    ("The answer is: Walking Georgie.", 1.0),
    ("I think the correct option is C", 0.0),
    ("I pick B", 1.0),  # the first A-D word
    ("I pick AB then B", 0.0),  # "AB" is a substring of "ABCD": it decides, and is no label
    ("The answer:", 0.0),  # the prefix ends the prediction
    ("", 0.0),
])
def test_longbook_choice(prediction, expected):
    assert score("longbook_choice_eng", prediction, OPTION) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("C. process_data", 1.0),
    ("C: it reads past the end", 1.0),
    ("C", 0.0),  # "C" alone is neither "C." nor "C:", and holds no prefix
    ("The answer is: C", 1.0),
    ("The correct option is: process_data", 1.0),  # "option" blanked; "is:" then the name
    ("The function with the bug is: `process_data`", 1.0),  # backticks blanked
    ("Option C is wrong; the answer: B", 0.0),  # "answer:" then B
    ("I don't know", 0.0),
])
def test_code_debug(prediction, expected):
    assert score("code_debug", prediction, ["process_data", "C"]) == expected


def test_choice_labels_are_checked():
    with pytest.raises(InfLLMLiteError, match="option_text, letter"):
        score("code_debug", "C.", ["process_data"])
    with pytest.raises(InfLLMLiteError, match="option_text, letter"):
        score("longbook_choice_eng", "C", ["C", "process_data"])


def test_longdialogue_first_answer_among_upper_cased_words():
    assert score("longdialogue_qa_eng", "Ace.", ["ACE"]) == 1.0
    assert score("longdialogue_qa_eng", "It is Ace Rothstein", ["ACE"]) == 1.0
    assert score("longdialogue_qa_eng", "Aces", ["ACE"]) == 0.0
    assert score("longdialogue_qa_eng", "Ace", ["BOB", "ACE"]) == 0.0  # only the first


def test_longbook_qa_eng_is_token_f1():
    # as qa_f1: "paris france" vs "paris": P = 1/2, R = 1, F1 = 2/3
    assert score("longbook_qa_eng", "Paris, France", ["London", "Paris"]) == pytest.approx(2 / 3)


def test_rouge_lsum_splits_sentences_at_newlines():
    pytest.importorskip("rouge_score")  # the eval extra
    reference = "alpha beta gamma\ndelta epsilon"
    # summary-level LCS: sentence 1 meets "alpha gamma" (alpha, gamma) and "beta delta
    # epsilon" (beta): 3 hits; sentence 2 meets the second line: 2 hits; P = R = 5/5
    assert score("longbook_sum_eng", "alpha gamma\nbeta delta epsilon", [reference]) \
        == pytest.approx(1.0)
    # as single lines: LCS(alpha gamma beta delta epsilon, alpha beta gamma delta epsilon) = 4,
    # P = R = 4/5
    assert score("longbook_sum_eng", "alpha gamma beta delta epsilon",
                 ["alpha beta gamma delta epsilon"]) == pytest.approx(0.8)
    # lower-cased, punctuation dropped
    assert score("longbook_sum_eng", "ALPHA, beta!", ["alpha beta"]) == pytest.approx(1.0)
    assert score("longbook_sum_eng", "", [reference]) == 0.0
