"""Heads against labels before any work (issue 20, case 1): classes must match the data's
labels (exactly or through a label map), a class needs min_instances audited instances
before a rule can judge it, and a class below it is reported as not evaluated, never
passed."""

from __future__ import annotations

import datetime as dt
import json
import xml.etree.ElementTree as ET

import pytest
from test_rules_support import audit, finding

from clipaudit.errors import InputError
from clipaudit.gate import (
    evaluate,
    exit_code,
    not_evaluated_classes,
    parse_ruleset,
    render_summary_md,
)
from clipaudit.gate.outputs import junit_tree
from clipaudit.heads.labels import LabelMap, load_label_map, match_labels

MUGS = ["mug"] * 30 + ["bottle"] * 25 + ["vase"] * 5


def test_classes_named_as_the_labels_match_and_other_labels_are_left_out():
    (matched,) = match_labels([("probe", ["mug", "bottle"])], MUGS).values()
    assert matched.by == "label"
    assert {c.class_name: c.n_instances for c in matched.classes} == {"mug": 30, "bottle": 25}
    assert matched.unused_labels == {"vase": 5}
    assert matched.instance_labels(["mug", None, "vase"]) == ["mug", None, "vase"]
    assert matched.below_minimum == []


def test_classes_matching_no_label_are_refused_naming_them_the_labels_and_close_ones():
    with pytest.raises(InputError) as e:
        match_labels([("zero-shot", ["Mug", "flask", "bottle"])], MUGS)
    message = str(e.value)
    assert "\n" not in message
    assert "2 class(es) match no label" in message and "'Mug' (closest: 'mug')" in message
    assert "'flask'" in message and "bottle, mug, vase" in message and "--label-map" in message


def test_a_label_map_translates_classes_to_labels_and_replaces_the_exact_match():
    label_map = LabelMap({"cup": ["mug"], "flask": ["bottle", "thermos"]}, "map.yaml")
    (matched,) = match_labels([("zero-shot", ["cup", "flask"])], MUGS, label_map=label_map).values()
    assert {c.class_name: c.labels for c in matched.classes} == {"cup": ["mug"], "flask": ["bottle"]}
    assert matched.instance_labels(["mug", "bottle", "vase"]) == ["cup", "flask", "vase"]
    # a class the map names stands for the map's labels only; a label spelled like it
    # that the map leaves out is an error, not a silent exclusion
    with pytest.raises(InputError, match="the data has a label 'mug'"):
        match_labels([("p", ["mug", "bottle"])], MUGS, label_map=LabelMap({"mug": ["vase"]}))


def test_a_label_may_belong_to_one_class_of_a_head_only():
    with pytest.raises(InputError, match="label 'mug' would belong to two classes"):
        match_labels([("p", ["mug", "cup"])], MUGS, label_map=LabelMap({"cup": ["mug"]}))
    # two heads may name the same label differently
    both = match_labels([("probe", ["mug", "bottle"]), ("zero-shot", ["cup", "bottle"])], MUGS,
                        label_map=LabelMap({"cup": ["mug"]}))
    assert both["zero-shot"].instance_labels(["mug"]) == ["cup"]
    assert both["probe"].instance_labels(["mug"]) == ["mug"]


def test_min_instances_lists_small_classes_and_refuses_a_head_with_none_large_enough():
    (matched,) = match_labels([("p", ["mug", "bottle"])], MUGS, min_instances=28).values()
    assert [c.class_name for c in matched.below_minimum] == ["bottle"]
    with pytest.raises(InputError, match="no class has the 31 audited instances"):
        match_labels([("p", ["mug", "bottle"])], MUGS, min_instances=31)


def test_unlabelled_data_is_matched_by_prediction_and_partly_labelled_data_adds_predictions():
    predicted = {"mug": 40, "bottle": 3}
    (matched,) = match_labels([("p", ["mug", "bottle"])], [None] * 43,
                              predict=lambda head: predicted).values()
    assert matched.by == "prediction"
    assert [(c.class_name, c.n_instances) for c in matched.below_minimum] == [("bottle", 3)]
    with pytest.raises(InputError, match="predicted: mug 0"):
        match_labels([("p", ["mug", "bottle"])], [None] * 43, predict=lambda head: {})
    partly = match_labels([("p", ["mug", "bottle"])], ["mug"] * 10 + ["bottle"] + [None] * 22,
                          predict=lambda head: {"mug": 2, "bottle": 20})["p"]
    assert {c.class_name: c.n_instances for c in partly.classes} == {"mug": 12, "bottle": 21}
    with pytest.raises(InputError, match="'bottle'"):  # labelled data: every class needs a label
        match_labels([("p", ["mug", "bottle"])], ["mug"] * 10 + [None] * 22,
                     predict=lambda head: {"mug": 2, "bottle": 20})


@pytest.mark.parametrize("name, text", [
    ("map.yaml", "cup: mug\nflask: [bottle, thermos]\n"),
    ("map.csv", "class,label\ncup,mug\nflask,bottle\nflask,thermos\n"),
    ("map.csv", "label,class\nmug,cup\nbottle,flask\n\nthermos,flask\n"),
])
def test_label_map_files_in_yaml_and_csv(tmp_path, name, text):
    fpath = tmp_path / name
    fpath.write_text(text)
    assert load_label_map(fpath).labels == {"cup": ["mug"], "flask": ["bottle", "thermos"]}


@pytest.mark.parametrize("name, text, match", [
    ("map.txt", "cup: mug", "not .txt"),
    ("map.yaml", "- cup\n- mug\n", "expected a mapping"),
    ("map.yaml", "cup: true\n", "got True"),
    ("map.yaml", "cup: []\n", "no label given"),
    ("map.yaml", "", "empty"),
    ("map.csv", "a,b\ncup,mug\n", "'class' and 'label'"),
    ("map.csv", "class,label\ncup\n", "line 2"),
])
def test_bad_label_maps_are_one_line_errors_naming_the_file(tmp_path, name, text, match):
    fpath = tmp_path / name
    fpath.write_text(text)
    with pytest.raises(InputError, match=match) as e:
        load_label_map(fpath)
    assert str(fpath) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ the gate


def _rules(**thresholds):
    return parse_ruleset({"version": 1, "thresholds": thresholds,
                          "checks": [{"id": "share", "check": "shortcut-share", "max_share": 0.15},
                                     {"id": "watch", "check": "shortcut-share", "severity": "warn",
                                      "max_share": 0.05}]})


def test_a_class_below_min_instances_is_not_evaluated_and_never_passes():
    result = audit([], n_instances={"benign": 100, "malignant": 15})
    verdicts = evaluate(result, _rules(min_instances=20))
    small = [v for v in verdicts if v.class_name == "malignant"]
    assert {v.status for v in small} == {"warn"} and len(small) == 2
    assert all("not evaluated: 15 audited instance(s)" in v.message for v in small)
    assert {v.status for v in verdicts if v.class_name == "benign"} == {"pass"}
    assert exit_code(verdicts) == 0
    (entry,) = not_evaluated_classes(verdicts)
    assert (entry.class_name, entry.n_instances, entry.min_instances) == ("malignant", 15, 20)
    # at the minimum the class is judged (and a large finding fails it)
    judged = evaluate(audit([finding(share=0.5)], n_instances={"malignant": 20}),
                      _rules(min_instances=20))
    assert exit_code(judged) == 1 and not not_evaluated_classes(judged)


def test_too_few_instances_can_fail_the_gate_and_a_waiver_can_accept_it():
    result = audit([], n_instances={"malignant": 3})
    failing = evaluate(result, _rules(too_few_instances="fail"))
    by_rule = {v.rule: v.status for v in failing if v.class_name == "malignant"}
    assert by_rule == {"share": "fail", "watch": "warn"}  # a warn rule never fails the gate
    assert exit_code(failing) == 1
    waived = parse_ruleset({"version": 1, "thresholds": {"too_few_instances": "fail"},
                            "checks": [{"id": "share", "check": "shortcut-share",
                                        "max_share": 0.15}],
                            "waivers": [{"rule": "share", "class": "malignant",
                                         "reason": "rare class, more images in v2"}]})
    verdicts = evaluate(result, waived, today=dt.date(2026, 1, 1))
    assert exit_code(verdicts) == 0
    assert [v.waived for v in verdicts if v.class_name == "malignant"] == [
        "rare class, more images in v2"]


def test_an_audit_with_no_class_large_enough_is_an_input_error():
    with pytest.raises(InputError, match="no class of head 'probe' has the 20 audited"):
        evaluate(audit([], n_instances={"benign": 0, "malignant": 19}), _rules())


def test_not_evaluated_classes_show_in_summary_junit_and_report(tmp_path):
    import dataclasses

    from clipaudit.report.build import build_report_data

    result = audit([], n_instances={"malignant": 4})
    result = dataclasses.replace(result, verdicts=evaluate(result, _rules()))
    summary = render_summary_md(result)
    assert "**1 class(es) not evaluated**" in summary and "### Not evaluated" in summary
    assert "| ⚠️ | probe | malignant | 4 | 20 |" in summary
    assert "### Warnings" not in summary  # listed once, as a class, not once per rule
    cases = {c.get("name"): c for c in junit_tree(result).iter("testcase")}
    skipped = cases["share [malignant]"].find("skipped")
    assert skipped is not None and "not evaluated" in skipped.get("message")
    assert cases["share [benign]"].find("skipped") is None
    data = build_report_data(result, tmp_path)
    assert [(r.class_name, r.n_instances) for r in data.not_evaluated] == [("malignant", 4)]
    assert not data.reasons and data.not_evaluated_status == "warn"
    json.dumps([dataclasses.asdict(r) for r in data.not_evaluated])
    ET.tostring(junit_tree(result))
    from clipaudit.report import write_report
    from clipaudit.results import save_audit

    named = dataclasses.replace(result, heads=[dataclasses.replace(
        result.heads[0], classes=[dataclasses.replace(c, class_name="<b>" + c.class_name)
                                  for c in result.heads[0].classes])])
    named = dataclasses.replace(named, verdicts=evaluate(named, _rules()))
    save_audit(named, tmp_path)
    html = write_report(tmp_path, html=True, pdf=False).html.read_text()
    assert "1 class(es) not evaluated</strong>" in html
    assert "probe / &lt;b&gt;malignant (4)" in html and "<b>malignant" not in html


def test_relevance_leaves_out_instances_labelled_with_no_class_of_the_head():
    import torch

    from clipaudit.attribution.patching import Attributions, class_relevance

    # 4 instances, one active component each (component = instance id), 2 classes
    values = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    attr = Attributions(ids=torch.arange(4), class_names=["mug", "bottle"], n_latents=4,
                        rows=torch.arange(4), components=torch.arange(4),
                        activations=torch.ones(4), values=values, error=torch.zeros(4, 2),
                        bias=torch.zeros(4, 2), scores=torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0]]),
                        head_bias=torch.zeros(2))
    rel = class_relevance(attr, ["mug", "mug", "bottle", "vase"])
    assert rel.n_instances.tolist() == [2, 1]  # the vase is in neither class
    assert rel.mean[:, 0].tolist() == [0.5, 1.5, 0.0, 0.0]
    assert rel.mean[:, 1].tolist() == [0.0, 0.0, 2.0, 0.0]
    unlabelled = class_relevance(attr, ["mug", "mug", "bottle", None])  # by prediction: mug
    assert unlabelled.n_instances.tolist() == [3, 1]


def test_on_a_cache_unlabelled_rows_are_counted_by_the_heads_prediction():
    """check_heads_against_labels reads the index, and the cached embeddings only for the
    unlabelled rows, which it assigns by the head's prediction."""
    from types import SimpleNamespace

    import pandas as pd
    import torch

    from clipaudit.heads.labels import check_heads_against_labels

    embeds = torch.tensor([[1.0, 0.0]] * 30 + [[0.0, 1.0]] * 5 + [[0.0, 1.0]] * 25)
    labels = [None] * 35 + ["mug"] + ["bottle"] * 24
    batches = []

    def iter_batches(batch_size, fields):
        assert set(fields) == {"embeds", "ids"}
        for s in range(0, len(embeds), batch_size):
            batches.append(s)
            yield {"embeds": embeds[s:s + batch_size], "ids": torch.arange(s, min(s + batch_size, 60))}

    cache = SimpleNamespace(ok_index=pd.DataFrame({"id": range(60), "label": labels}),
                            iter_batches=iter_batches)
    head = SimpleNamespace(name="probe", class_names=["mug", "bottle"],
                           scores=lambda e: e @ torch.eye(2))
    (matched,) = check_heads_against_labels([head], cache, min_instances=20,
                                            batch_size=16).values()
    assert {c.class_name: c.n_instances for c in matched.classes} == {"mug": 31, "bottle": 29}
    assert batches  # embeddings were read, in batches
    labelled = SimpleNamespace(ok_index=pd.DataFrame({"id": range(2), "label": ["mug", "bottle"]}),
                               iter_batches=lambda *a, **k: pytest.fail("read embeddings"))
    with pytest.raises(InputError, match="no class has the 20"):
        check_heads_against_labels([head], labelled)
