"""The exception tree: messages name the bad value and the valid choices."""

from camserve.errors import (
    CamserveError,
    ImageTooLargeError,
    InternalError,
    InvalidRequestError,
    ModelFailureError,
    UnavailableError,
    UnknownNameError,
)


def test_unknown_name_lists_choices() -> None:
    err = UnknownNameError("method", "gradcamx", ["gradcam", "cam"])
    assert str(err) == "unknown method 'gradcamx'; valid methods: cam, gradcam"
    assert isinstance(err, InvalidRequestError)
    assert isinstance(err, KeyError)
    assert not hasattr(err, "http_status") and not hasattr(err, "grpc_code")


def test_unknown_name_truncates_long_choice_lists() -> None:
    err = UnknownNameError("class", 5000, range(1000))
    assert "(1000 in all)" in str(err)


def test_the_new_errors_say_what_failed() -> None:
    err = ModelFailureError("non-finite logits", model="resnet_gap")
    assert str(err) == "model 'resnet_gap': non-finite logits" and err.model == "resnet_gap"
    assert isinstance(UnavailableError("down"), CamserveError)
    assert isinstance(InternalError("bug"), CamserveError)
    assert not isinstance(ImageTooLargeError("big"), ModelFailureError)
