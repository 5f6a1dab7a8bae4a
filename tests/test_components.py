"""Tests of building components from site code: arguments, sys.path hygiene, errors, fresh site code."""

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcommon.components import ComponentError, build_component
from fedcommon.mmar import Component

SITE_CODE = """
class Widget:
    def __init__(self, size, colour="red", site_name=None):
        self.size = size
        self.colour = colour
        self.site_name = site_name


class Fragile:
    def __init__(self):
        raise RuntimeError("disk full")


NOT_A_CLASS = 3
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A custom/ folder holding module `fedtest_widgets`; the module is forgotten afterwards."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "fedtest_widgets.py").write_text(SITE_CODE)
    yield folder
    for name in [n for n in sys.modules if n.startswith("fedtest_")]:
        del sys.modules[name]


def test_builds_class_with_configured_args_and_caller_kwargs(site: Path) -> None:
    widget = build_component(Component("fedtest_widgets.Widget", {"size": 3}), [site], site_name="site-1")

    assert type(widget).__name__ == "Widget"
    assert (widget.size, widget.colour, widget.site_name) == (3, "red", "site-1")


def test_sys_path_is_restored_after_success_and_failure(site: Path) -> None:
    before = list(sys.path)

    build_component(Component("fedtest_widgets.Widget", {"size": 1}), [site])
    with pytest.raises(ComponentError):
        build_component(Component("fedtest_widgets.Fragile", {}), [site])

    assert sys.path == before


def test_missing_module_is_named(site: Path) -> None:
    with pytest.raises(ComponentError, match=r"component 'fedtest_nothing\.Net': module 'fedtest_nothing' not found"):
        build_component(Component("fedtest_nothing.Net", {}), [site])


def test_missing_class_is_named(site: Path) -> None:
    with pytest.raises(ComponentError, match=r"module 'fedtest_widgets' \(.*fedtest_widgets\.py\) has no 'Gadget'"):
        build_component(Component("fedtest_widgets.Gadget", {}), [site])


def test_attribute_that_is_not_a_class_is_refused(site: Path) -> None:
    with pytest.raises(ComponentError, match=r"'NOT_A_CLASS' is a int, not a class"):
        build_component(Component("fedtest_widgets.NOT_A_CLASS", {}), [site])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"size": 1, "shape": "round"}, "unexpected keyword argument 'shape'"),
        ({}, "missing a required argument: 'size'"),
    ],
)
def test_bad_args_are_reported_with_the_component_path(site: Path, args: dict, says: str) -> None:
    with pytest.raises(ComponentError) as info:
        build_component(Component("fedtest_widgets.Widget", args), [site])

    message = str(info.value)
    assert message.startswith("component 'fedtest_widgets.Widget': bad arguments")
    assert says in message


def test_args_the_caller_sets_must_not_be_configured(site: Path) -> None:
    component = Component("fedtest_widgets.Widget", {"size": 1, "site_name": "site-9"})

    with pytest.raises(ComponentError, match=r"args \['site_name'\] are set by the caller"):
        build_component(component, [site], site_name="site-1")


def test_constructor_failure_is_wrapped_with_its_cause(site: Path) -> None:
    with pytest.raises(ComponentError, match=r"'fedtest_widgets\.Fragile': constructor raised RuntimeError: disk full"):
        build_component(Component("fedtest_widgets.Fragile", {}), [site])


def test_failing_import_inside_the_module_is_not_mistaken_for_a_missing_module(site: Path) -> None:
    (site / "fedtest_broken.py").write_text("import fedtest_absent_dependency\n")

    with pytest.raises(ComponentError) as info:
        build_component(Component("fedtest_broken.Thing", {}), [site])

    assert "importing module 'fedtest_broken' failed: No module named 'fedtest_absent_dependency'" in str(info.value)


def test_module_raising_on_import_is_reported(site: Path) -> None:
    (site / "fedtest_raises.py").write_text("raise ImportError('needs a GPU')\n")

    with pytest.raises(ComponentError, match=r"importing module 'fedtest_raises' raised ImportError: needs a GPU"):
        build_component(Component("fedtest_raises.Thing", {}), [site])


def test_fedlearn_classes_build_without_search_paths() -> None:
    validator = build_component(Component("fedclient.components.model_validator.ModelValidator", {}))

    assert type(validator).__name__ == "ModelValidator"


@pytest.mark.parametrize(
    ("path", "args"),
    [
        ("subprocess.Popen", {"args": ["touch", "{marker}"]}),
        ("os.system", {"command": "touch {marker}"}),
        ("shutil.rmtree", {"path": "{victim}"}),
        ("builtins.eval", {"source": "open('{marker}', 'w')"}),
        ("collections.Counter", {}),
    ],
)
def test_installed_modules_outside_site_code_and_fedlearn_are_refused_unbuilt(
    tmp_path: Path, site: Path, path: str, args: dict
) -> None:
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    args = {k: _fill(v, marker=marker, victim=victim) for k, v in args.items()}

    with pytest.raises(ComponentError) as info:
        build_component(Component(path, args), [site])

    module = path.split(".")[0]
    assert str(info.value).startswith(f"component {path!r}: module {module!r} (")
    assert "is outside the search folders" in str(info.value) and "fedlearn's packages" in str(info.value)
    assert not marker.exists() and victim.is_dir()


def _fill(value: object, **names: Path) -> object:
    if isinstance(value, list):
        return [_fill(v, **names) for v in value]
    return value.format(**names) if isinstance(value, str) else value


def test_a_class_that_site_code_imports_from_elsewhere_is_refused(tmp_path: Path, site: Path) -> None:
    (site / "fedtest_reexport.py").write_text("from subprocess import Popen\n")
    marker = tmp_path / "marker"

    with pytest.raises(ComponentError) as info:
        build_component(Component("fedtest_reexport.Popen", {"args": ["touch", str(marker)]}), [site])

    message = str(info.value)
    assert message.startswith("component 'fedtest_reexport.Popen': class 'Popen' is defined in module 'subprocess' (")
    assert "outside the search folders" in message
    assert not marker.exists()


def test_a_site_module_that_links_outside_the_search_folder_is_not_imported(tmp_path: Path, site: Path) -> None:
    marker = tmp_path / "imported"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "fedtest_linked.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    (site / "fedtest_linked.py").symlink_to(elsewhere / "fedtest_linked.py")

    with pytest.raises(ComponentError, match=r"module 'fedtest_linked' \(.*\) is outside the search folders"):
        build_component(Component("fedtest_linked.Thing", {}), [site])

    assert not marker.exists()


def test_a_site_module_named_like_an_imported_standard_module_is_refused(site: Path) -> None:
    (site / "os.py").write_text("class system:\n    pass\n")

    with pytest.raises(ComponentError, match=r"module 'os' \(.*\) is outside the search folders"):
        build_component(Component("os.system", {"command": "true"}), [site])


def test_a_search_folder_that_is_a_symlink_is_refused(tmp_path: Path, site: Path) -> None:
    link = tmp_path / "linked_custom"
    link.symlink_to(site, target_is_directory=True)

    with pytest.raises(ComponentError, match=r"search folder .*linked_custom is a symbolic link"):
        build_component(Component("fedtest_widgets.Widget", {"size": 1}), [link])


def test_a_function_is_not_a_component(site: Path) -> None:
    (site / "fedtest_factory.py").write_text("def make():\n    return 1\n")

    with pytest.raises(ComponentError, match=r"'make' is a function, not a class"):
        build_component(Component("fedtest_factory.make", {}), [site])


def test_a_second_folder_with_the_same_module_name_gets_its_own_code(tmp_path: Path, site: Path) -> None:
    other = tmp_path / "other_run" / "custom"
    other.mkdir(parents=True)
    (other / "fedtest_widgets.py").write_text(
        textwrap.dedent(
            """
            class Widget:
                def __init__(self, size):
                    self.size = size * 100
            """
        )
    )

    first = build_component(Component("fedtest_widgets.Widget", {"size": 1}), [site])
    second = build_component(Component("fedtest_widgets.Widget", {"size": 1}), [other])

    assert (first.size, second.size) == (1, 100)


def test_changed_site_code_in_the_same_folder_is_reimported(site: Path) -> None:
    first = build_component(Component("fedtest_widgets.Widget", {"size": 2}), [site])
    module = site / "fedtest_widgets.py"
    module.write_text("class Widget:\n    def __init__(self, size):\n        self.size = -size\n")
    stat = module.stat()
    # Coarse file-system clocks can give the rewrite the old mtime; make the change visible.
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    second = build_component(Component("fedtest_widgets.Widget", {"size": 2}), [site])

    assert (first.size, second.size) == (2, -2)
