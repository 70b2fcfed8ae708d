"""columns.yaml: column roles a data set declares beside its manifest."""

from __future__ import annotations

import pytest
import yaml

from clipaudit.errors import ArtifactError, InputError
from clipaudit.extraction.columns import (
    ColumnRoles,
    find_column_roles,
    load_column_roles,
    write_column_roles,
)
from clipaudit.synthetic import ARTIFACTS, MANIFEST_COLUMNS, make_planted_dataset


def test_planted_dataset_declares_its_columns(tmp_path):
    data = make_planted_dataset(tmp_path, artifact="ruler", n=4)
    roles = find_column_roles(data.manifest_fpath, MANIFEST_COLUMNS)
    assert data.column_roles_fpath == tmp_path / "columns.yaml"
    assert roles.artifact == tuple(f"has_{a}" for a in ARTIFACTS)
    # the lesion columns decide the label: relying on them is the task, not a shortcut
    assert roles.protected == ("skin_tone",)
    assert roles.ignore == ("caption", "lesion_colour", "lesion_border", "lesion_size")
    assert roles.role_of("has_hair") == "artifact" and roles.role_of("lesion_colour") == "ignore"
    assert roles.role_of("facing") is None  # a column the data set does not name
    header = yaml.safe_load(data.column_roles_fpath.read_text())
    assert header["kind"] == "column-roles" and header["provenance"]["world"] == "dermatology"


def test_a_hand_written_file_needs_no_header(tmp_path):
    fpath = tmp_path / "columns.yaml"
    fpath.write_text("artifact: [has_tag]\n# no protected columns here\nignore: [id]\n")
    assert load_column_roles(fpath, ["path", "label", "has_tag", "id"]) == \
        ColumnRoles(artifact=("has_tag",), ignore=("id",))
    assert find_column_roles(tmp_path / "manifest.csv") == ColumnRoles(("has_tag",), (), ("id",))
    assert find_column_roles(tmp_path / "elsewhere" / "manifest.csv") is None


def test_written_roles_read_back(tmp_path):
    roles = ColumnRoles(artifact=("a", "b"), protected=("sex",), ignore=("note",))
    assert load_column_roles(write_column_roles(tmp_path / "columns.yaml", roles)) == roles


@pytest.mark.parametrize("text, message", [
    ("artifact: has_tag\n", "artifact: expected a list of column names"),
    ("artifacts: [has_tag]\n", "unknown key\\(s\\) 'artifacts'. Available: artifact, protected"),
    ("artifact: [x]\nignore: [x]\n", "'x' is listed under both artifact and ignore"),
    ("protected: [label]\n", "'label' is the manifest's label column"),
    ("artifact: [has_missing]\n", "artifact: no column 'has_missing' in the manifest"),
    ("- has_tag\n", "expected a mapping of roles"),
    ("artifact: [unclosed\n", "not valid YAML"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, message):
    fpath = tmp_path / "columns.yaml"
    fpath.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_column_roles(fpath, ["path", "label", "x", "has_tag"])
    assert str(err.value).startswith(str(fpath)) and "\n" not in str(err.value)


def test_a_header_of_another_kind_is_refused(tmp_path):
    fpath = tmp_path / "columns.yaml"
    fpath.write_text("kind: probe\nschema_version: 1\nartifact: []\n")
    with pytest.raises(ArtifactError, match="expected a clipaudit 'column-roles' file"):
        load_column_roles(fpath)
