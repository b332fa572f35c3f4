"""The evaluation text: docstring sentences and the other sources, disjoint and deterministic."""
import pytest

from pyquant.sentences import labelled_sentences, prose_sentences, reference_sentences, split_sentences


def test_split_is_disjoint_and_deterministic():
    calib, held = split_sentences(300, 100, seed=3)
    assert len(calib) == 300 and len(held) == 100 and not set(calib) & set(held)
    assert (calib, held) == split_sentences(300, 100, seed=3)
    assert calib != split_sentences(300, 100, seed=4)[0]


def test_other_sources_share_no_sentence_with_the_docstrings():
    docstrings = {s for s, _ in labelled_sentences()}
    reference = reference_sentences(None)
    prose = prose_sentences()
    assert prose[:len(reference)] == reference  # the reference first, in its order
    assert len(set(prose)) == len(prose) and not set(prose) & docstrings
    assert prose == prose_sentences() and prose_sentences(10) == prose[:10]
    with pytest.raises(ValueError, match="n must be between"):
        prose_sentences(len(prose) + 1)
