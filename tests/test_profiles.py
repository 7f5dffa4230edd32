import pytest

from helpers.profiles import ENV_VAR, Profile, ProfileError, get_profile


@pytest.mark.parametrize("name", ["paper", "embedded", "ci"])
def test_each_profile_resolves_from_the_environment(monkeypatch, name):
    monkeypatch.setenv(ENV_VAR, name)
    assert get_profile().name == name


def test_unset_or_empty_variable_means_paper(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_profile().name == "paper"
    monkeypatch.setenv(ENV_VAR, "  ")
    assert get_profile().name == "paper"


def test_argument_overrides_environment_and_is_normalised(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "paper")
    assert get_profile(" CI ").name == "ci"


def test_bad_profile_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "embeded")
    with pytest.raises(ProfileError) as err:
        get_profile()
    message = str(err.value)
    assert "'embeded'" in message and ENV_VAR in message
    assert all(name in message for name in ("paper", "embedded", "ci"))


def test_choose_picks_the_active_profile_value_and_requires_all_three():
    assert Profile("ci").choose(paper=100, embedded=64, ci=8) == 8
    assert Profile("embedded").choose(paper=100, embedded=64, ci=8) == 64
    assert Profile("paper").choose(paper=100, embedded=64, ci=8) == 100
    with pytest.raises(TypeError):
        Profile("ci").choose(paper=1, ci=2)  # type: ignore[call-arg]


def test_embedded_model_flag():
    assert Profile("ci").uses_embedded_model and Profile("embedded").uses_embedded_model
    assert not Profile("paper").uses_embedded_model


# --------------------------------------------------------------------------------------------------
# The model switch MI_MODEL
# --------------------------------------------------------------------------------------------------

from helpers import models  # noqa: E402
from helpers.profiles import (  # noqa: E402
    EMBEDDED_MODELS,
    MODEL_ENV_VAR,
    ModelChoiceError,
    get_embedded_model,
    output_subdir,
)


def test_unset_or_empty_model_switch_means_smollm2(monkeypatch):
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    assert get_embedded_model().name == "smollm2" and get_embedded_model().load_name == "embedded"
    monkeypatch.setenv(MODEL_ENV_VAR, " ")
    assert get_embedded_model().is_default


@pytest.mark.parametrize("value", ["gemma-3-270m", "Gemma3-270M", " gemma3 "])
def test_model_switch_resolves_gemma_and_its_aliases(monkeypatch, value):
    monkeypatch.setenv(MODEL_ENV_VAR, value)
    choice = get_embedded_model()
    assert choice.name == "gemma-3-270m" and choice.load_name == "gemma-3-270m" and not choice.is_default


def test_every_choice_is_a_model_load_model_knows():
    for choice in EMBEDDED_MODELS:
        assert models.display_name(choice.load_name) in (models.EMBEDDED_DISPLAY_NAME, models.GEMMA_DISPLAY_NAME)


def test_bad_model_switch_is_a_clear_error_listing_the_choices(monkeypatch):
    monkeypatch.setenv(MODEL_ENV_VAR, "gemma-2b")
    with pytest.raises(ModelChoiceError) as err:
        get_embedded_model()
    message = str(err.value)
    assert "'gemma-2b'" in message and MODEL_ENV_VAR in message
    assert all(repr(choice.name) in message for choice in EMBEDDED_MODELS)
    with pytest.raises(ModelChoiceError, match="argument"):
        get_embedded_model("llama")


def test_outputs_of_another_model_go_to_its_own_folder(monkeypatch):
    monkeypatch.setenv(MODEL_ENV_VAR, "gemma3")
    assert output_subdir(Profile("ci")) == "gemma-3-270m" == output_subdir(Profile("embedded"))
    assert output_subdir(Profile("paper")) == ""  # MI_MODEL is not used in the paper profile
    monkeypatch.delenv(MODEL_ENV_VAR)
    assert output_subdir(Profile("embedded")) == ""
