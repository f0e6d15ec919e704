import pytest

from lingua_sweep.errors import UserError
from lingua_sweep.registry import Registry


def test_register_decorator_returns_the_object_and_makes_it_gettable():
    reg = Registry("widget")

    @reg.register("a")
    def make_a():
        return "A"

    assert make_a() == "A"
    assert reg.get("a") is make_a
    assert "a" in reg and reg.names() == ["a"]


def test_unknown_name_lists_registered_names():
    reg = Registry("widget")
    reg.register("b")(object)
    reg.register("a")(object)
    with pytest.raises(UserError, match=r"unknown widget 'c'; registered: a, b"):
        reg.get("c")


def test_registering_a_name_twice_fails():
    reg = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object)
