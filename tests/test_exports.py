"""The public surface: __all__ is sorted and matches what the package exports."""

import tensorstore_pt
import tensorstore_pt.errors as errors


def test_all_is_sorted_and_complete():
    public = {name for name in dir(tensorstore_pt) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(tensorstore_pt, name)).__name__ == "module"}
    assert list(tensorstore_pt.__all__) == sorted(tensorstore_pt.__all__)
    assert set(tensorstore_pt.__all__) - {"__version__"} == public - modules


def test_every_error_is_exported_and_in_the_tree():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TensorStoreError)
        assert getattr(tensorstore_pt, name) is cls
        assert name in errors.__doc__, f"{name} is missing from the tree drawn in errors.py"
        if cls is not errors.TensorStoreError:
            assert any(b.__module__ == "builtins" and b is not Exception for b in cls.__mro__[1:]), name
