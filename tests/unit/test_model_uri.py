import pytest

from nodewise.core.errors import InvalidModelURI
from tasks.planning.registry import ModelURI, parse_model_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/digits@champion", ModelURI("digits", alias="champion")),
        ("models:/digits/3", ModelURI("digits", version="3")),
        ("models:/my.model-v2@stage_1", ModelURI("my.model-v2", alias="stage_1")),
        ("  models:/digits/12  ", ModelURI("digits", version="12")),
    ],
)
def test_valid_uris(uri: str, expected: ModelURI) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "digits",
        "models:/digits",
        "models:/digits/0",
        "models:/digits/v3",
        "models:/digits@",
        "models:/@champion",
        "runs:/abc/model",
        "models:/a/b/3",
        "models:/digits@champ ion",
        "",
    ],
)
def test_invalid_uris_name_the_value_and_the_forms(uri: str) -> None:
    with pytest.raises(InvalidModelURI, match=r"is not valid: use models:/NAME@ALIAS .* models:/NAME/VERSION") as e:
        parse_model_uri(uri)
    assert repr(uri) in str(e.value)


def test_str_round_trips() -> None:
    for uri in ("models:/digits@champion", "models:/digits/7"):
        assert str(parse_model_uri(uri)) == uri
