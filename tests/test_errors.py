"""Load failures are explained for a person, not pasted from a library."""

from clair.base.errors import load_failure


def test_a_model_missing_offline_says_to_connect_or_use_a_local_folder():
    exc = OSError("Cannot load model x/y: the model is not fully cached locally (outgoing traffic disabled)")
    msg = load_failure("image model", "x/y", exc, "CLAIR_IMAGE_MODEL")
    assert "not downloaded yet" in msg and "CLAIR_IMAGE_MODEL" in msg and "--demo" in msg
    assert "outgoing traffic" not in msg


def test_other_failures_keep_the_cause_whole_words_and_one_full_stop():
    exc = ValueError("bad config. " + "word " * 100)
    msg = load_failure("image model", "/m", exc, "CLAIR_IMAGE_MODEL")
    assert msg.startswith("Could not load the image model /m: bad config.")
    assert " … Check CLAIR_IMAGE_MODEL" in msg and " wor …" not in msg
    assert ".." not in load_failure("chat model", "m", ValueError("ends with a dot."), "X")
