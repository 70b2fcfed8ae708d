"""CLI verbs: ``vocab list | show`` (the concept vocabularies that label components)."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from clipaudit.cli import app
from clipaudit.cli._common import json_option, out, print_json, quiet_option, user_errors
from clipaudit.cli._exit import ClipAuditGroup

vocab_app = typer.Typer(cls=ClipAuditGroup, no_args_is_help=True,
                        help="Concept vocabularies: the words components are labelled with.")
app.add_typer(vocab_app, name="vocab")


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".") + "." if text else ""


@vocab_app.command("list")
@user_errors
def list_cmd(json_out: bool = json_option("the vocabularies"),
             quiet: bool = quiet_option()) -> None:
    """List the shipped vocabularies (pass one or several to audit with --vocab)."""
    from clipaudit.describe import list_vocabulary_infos

    infos = list_vocabulary_infos()
    if json_out:
        print_json([i.as_dict(concepts=False) for i in infos])
        return
    table = Table("name", "concepts", "synonyms", "what it is for", title="Concept vocabularies",
                  title_justify="left")
    for i in infos:
        table.add_row(Text(i.name), str(i.n_concepts), str(i.n_synonyms),
                      Text(_first_sentence(i.description)))
    out.print(table)
    if quiet:
        return
    out.print("Combine them (--vocab general --vocab product) or add your own file "
              "(--vocab terms.yaml); `clipaudit vocab show NAME|FILE` lists the concepts.",
              markup=False)


@vocab_app.command("show")
@user_errors
def show_cmd(
    name: str = typer.Argument(..., help="A shipped vocabulary name or a .txt/.yaml file."),
    json_out: bool = json_option("the vocabulary's concepts and synonyms"),
    quiet: bool = quiet_option(),
) -> None:
    """Show a vocabulary's concepts and synonyms, as clipaudit reads them."""
    from clipaudit.describe import vocabulary_info

    info = vocabulary_info(name)
    if json_out:
        print_json(info.as_dict())
        return
    title = f"{info.name} ({info.source}, {info.n_concepts} concepts): {info.path}"
    table = Table("concept (the label)", "synonyms (also encoded)", title=Text(title),
                  title_justify="left")
    for concept in info.vocabulary.concepts:
        table.add_row(Text(concept), Text(", ".join(info.vocabulary.synonyms.get(concept, []))))
    out.print(table)
