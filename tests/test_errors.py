"""The exception tree: messages name the bad value and the valid choices."""

from camserve.errors import (
    CamserveError,
    ImageTooLargeError,
    InvalidRequestError,
    UnknownNameError,
)


def test_unknown_name_lists_choices() -> None:
    err = UnknownNameError("method", "gradcamx", ["gradcam", "cam"])
    assert str(err) == "unknown method 'gradcamx'; valid methods: cam, gradcam"
    assert isinstance(err, InvalidRequestError)
    assert isinstance(err, KeyError)
    assert err.http_status == 400
    assert err.grpc_code == "INVALID_ARGUMENT"


def test_unknown_name_truncates_long_choice_lists() -> None:
    err = UnknownNameError("class", 5000, range(1000))
    assert "(1000 in all)" in str(err)


def test_status_codes() -> None:
    assert ImageTooLargeError("too big").http_status == 413
    assert CamserveError("x").grpc_code == "INTERNAL"
