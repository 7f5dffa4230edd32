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
