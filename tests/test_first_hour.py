"""The first hour's traps (issue 16 part 3): Dropout's keyword and string labels."""
import numpy as np
import pytest

import fastdl as fd


def test_dropout_keep_prob_and_rate_are_complements():
    assert fd.Dropout(keep_prob=0.8).keep_prob == 0.8
    assert fd.Dropout(rate=0.25).keep_prob == 0.75
    assert fd.Dropout(rate=0.0).keep_prob == 1.0
    # the saved config stays keep_prob, whatever was passed
    assert fd.Dropout(rate=0.5).get_config() == {"keep_prob": 0.5}


def test_dropout_positional_value_explains_both_conventions():
    with pytest.raises(TypeError) as info:
        fd.Dropout(0.2)
    msg = str(info.value)
    assert "keep_prob=" in msg and "rate=" in msg and "Dropout(0.2)" in msg


@pytest.mark.parametrize("kwargs", [{}, {"keep_prob": 0.8, "rate": 0.2}])
def test_dropout_needs_exactly_one_of_keep_prob_and_rate(kwargs):
    with pytest.raises(TypeError, match="exactly one of keep_prob"):
        fd.Dropout(**kwargs)


@pytest.mark.parametrize("kwargs", [{"rate": 1.0}, {"rate": -0.1}, {"keep_prob": 0.0}, {"keep_prob": 1.5}])
def test_dropout_out_of_range(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fd.Dropout(**kwargs)


def test_dropout_rate_trains_like_keep_prob():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    models = [fd.Sequential([fd.Dense(5, 8), fd.ReLU(), d, fd.Dense(8, 3)], backend="reference", seed=1)
              for d in (fd.Dropout(keep_prob=0.7), fd.Dropout(rate=0.3))]
    for model in models:
        model.fit(X, y, epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(models[0].params, models[1].params)


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "cat", "bird"]),
                                    np.array([None, "x", 1, 2.5], dtype=object)])
def test_string_labels_error_names_the_fix(labels):
    model = fd.Sequential([fd.Dense(2, 3)], backend="reference")
    with pytest.raises(TypeError) as info:
        model.fit(np.zeros((4, 2)), labels, epochs=1, verbose=0)
    msg = str(info.value)
    assert "np.unique(y, return_inverse=True)" in msg
    assert "LabelEncoder" in msg and "MLPClassifier" in msg


def test_string_labels_binary_error_names_the_fix():
    model = fd.Sequential([fd.Dense(2, 1)], loss="binary_cross_entropy", backend="reference")
    with pytest.raises(TypeError, match="return_inverse=True"):
        model.fit(np.zeros((2, 2)), np.array(["no", "yes"]), epochs=1, verbose=0)


def test_the_suggested_fix_works():
    y = np.array(["cat", "dog", "cat", "bird"])
    classes, y_ids = np.unique(y, return_inverse=True)
    model = fd.Sequential([fd.Dense(2, len(classes))], backend="reference")
    model.fit(np.zeros((4, 2)), y_ids, epochs=1, verbose=0)
    assert classes[model.predict(np.zeros((1, 2)))][0] in set(y)
