"""Metadata columns: keys, the concepts they mark, and where their roles come from."""

import pandas as pd
import pytest

from clipaudit.columns import (
    RoleSources,
    column_keys,
    derived_concept,
    find_declared_roles,
    key_presence,
    load_declared_roles,
    parse_role_overrides,
    write_declared_roles,
)
from clipaudit.errors import InputError


def test_binary_and_categorical_columns_become_keys_and_continuous_ones_do_not():
    meta = pd.DataFrame({
        "has_band_aid": [True, False, True, None],
        "watermark": [1, 0, 0, 1],
        "skin_tone": ["dark", "fair", "olive", "fair"],
        "age": [31.5, 40.2, 55.1, 62.0],
        "site": ["a"] * 4,
    })
    keys = {k.key: k for k in column_keys(meta)}
    assert sorted(keys) == ["has_band_aid", "skin_tone=dark", "skin_tone=fair", "skin_tone=olive",
                            "watermark"]
    assert keys["has_band_aid"].concept == "band aid" and keys["watermark"].value == 1
    assert keys["skin_tone=dark"].concept == "dark skin tone"
    assert list(key_presence(meta, keys["has_band_aid"])) == [1, 0, 1, -1]
    assert list(key_presence(meta, keys["skin_tone=fair"])) == [0, 1, 0, 1]


@pytest.mark.parametrize("column, value, concept", [
    ("has_ruler", None, "ruler"), ("is_blurry", None, "blurry"), ("has_", None, "has"),
    ("hospital-tag", None, "hospital tag"), ("sex", "female", "female sex"),
])
def test_derived_concepts(column, value, concept):
    assert derived_concept(column, value) == concept


def test_roles_command_line_over_rule_file_over_data_set():
    sources = RoleSources(overrides={"has_tag": "ignore"}, artifact_globs=["HAS_*"],
                          protected_globs=["skin*"], ignored_globs=["has_hair"],
                          declared={"has_tag": "artifact", "site": "protected", "has_hair": "artifact"})
    assert sources.role("has_tag") == ("ignore", "command line")
    assert sources.role("has_ruler") == ("artifact", "rule file")
    assert sources.role("has_hair") == ("artifact", "rule file")  # artifact wins over ignore
    assert sources.role("skin_tone") == ("protected", "rule file")
    assert sources.role("site") == ("protected", "data set")
    assert sources.role("age") == (None, "")


def test_declared_roles_round_trip_and_accept_a_clipaudit_header(tmp_path):
    write_declared_roles(tmp_path, artifact=["has_ruler"], protected=["skin_tone"],
                         ignore=["lesion_size"])
    roles = find_declared_roles(tmp_path)
    assert roles.roles == {"has_ruler": "artifact", "skin_tone": "protected", "lesion_size": "ignore"}
    assert find_declared_roles(tmp_path / "elsewhere").roles == {}
    (tmp_path / "columns.yaml").write_text("kind: column-roles\nschema_version: 1\n"
                                           "artifact: [has_tag]\nprotected: [has_tag]\n")
    assert load_declared_roles(tmp_path / "columns.yaml").roles == {"has_tag": "protected"}


@pytest.mark.parametrize("text, message", [
    ("artifact: has_tag\n", "artifact: expected a list of column names"),
    ("artifacts: [has_tag]\n", "unknown key"),
    ("- has_tag\n", "expected a mapping of roles"),
    ("artifact: [unclosed\n", "cannot read the column roles"),
])
def test_bad_role_files_name_the_file(tmp_path, text, message):
    fpath = tmp_path / "columns.yaml"
    fpath.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_declared_roles(fpath)
    assert str(err.value).startswith(str(fpath)) and "\n" not in str(err.value)


def test_role_overrides_from_the_command_line():
    assert parse_role_overrides(["has_tag=artifact", " age = Ignore "]) == \
        {"has_tag": "artifact", "age": "ignore"}
    for bad in ("has_tag", "has_tag=spurious", "=artifact"):
        with pytest.raises(InputError, match="expected COLUMN=ROLE"):
            parse_role_overrides([bad])
