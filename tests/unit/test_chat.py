import base64

import pytest

from vlm_engine.chat import decode_data_url, parse_openai_messages
from vlm_engine.errors import InvalidImage, InvalidRequest


def test_string_and_part_contents():
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    messages = parse_openai_messages(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What"},
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "is it?"},
                ],
            },
        ]
    )
    assert [(m.role, m.text, m.images) for m in messages] == [
        ("system", "Be brief.", []),
        ("user", "What\nis it?", [b"\x89PNG fake"]),
    ]


@pytest.mark.parametrize(
    ("messages", "error", "says"),
    [
        ([], InvalidRequest, "non-empty list"),
        ("hello", InvalidRequest, "non-empty list"),
        ([{"role": "robot", "content": "hi"}], InvalidRequest, "role must be one of"),
        ([{"role": "user", "content": 5}], InvalidRequest, "string or a list"),
        ([{"role": "user", "content": "hi", "name": {}}], InvalidRequest, r"messages\[0\].name must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "max"}}]}],
            InvalidRequest,
            "detail must be one of",
        ),
        ([{"role": "user", "content": [{"type": "audio"}]}], InvalidRequest, r"content\[0\] must be"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}],
            InvalidImage,
            "remote image URLs are not fetched",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
            InvalidImage,
            "valid base64",
        ),
    ],
)
def test_malformed_messages_say_where(messages, error, says):
    with pytest.raises(error, match=says):
        parse_openai_messages(messages)


def test_data_url_needs_base64():
    assert decode_data_url("data:image/jpeg;base64,aGk=") == b"hi"
    with pytest.raises(InvalidImage, match="data URL like"):
        decode_data_url("data:image/jpeg,hi")
