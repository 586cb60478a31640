"""The support matrix: op_profile profiles every family; head similarity reads every softmax-attention family timm
ships and refuses the others in one line; Taylor pruning prunes the families it claims (by their builders or by
discovery) and refuses the others in one line; the README's table says what each of the three analyses really
does."""
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.support_matrix import (ANALYSES, FAMILIES, README_BEGIN, README_END, main, readme_table,
                                        replace_readme_table, short_cell, support_matrix)

README = Path(__file__).resolve().parents[1] / "README.md"


def _computed(analysis: str) -> pd.DataFrame:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return support_matrix(analyses=(analysis,)).set_index("model")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def op_profile_column() -> pd.DataFrame:
    return _computed("op_profile")


@pytest.fixture(scope="module")
def head_similarity_column() -> pd.DataFrame:
    return _computed("head_similarity")


@pytest.fixture(scope="module")
def taylor_prune_column() -> pd.DataFrame:
    return _computed("taylor_prune")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model for f in FAMILIES])
def test_op_profile_counts_every_family(family, op_profile_column):
    """Every family profiles: its op signatures counted, any op the classes do not know named."""
    cell = op_profile_column.at[family.model, "op_profile"]
    found = re.fullmatch(r"yes: (\d+) op signatures(, unclassified ops: aten::\S+(, aten::\S+)*)?", cell)
    assert found and int(found[1]) > 10, cell


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model for f in FAMILIES])
def test_head_similarity_reads_every_softmax_attention_family(family, head_similarity_column):
    cell = head_similarity_column.at[family.model, "head_similarity"]
    if family.heads:
        assert cell.startswith("yes: ") and "sites" in cell, cell
    else:  # a refusal in one line, never a crash
        assert cell.startswith("no: ") and "\n" not in cell, cell
        assert "no softmax attention" in cell or "single head" in cell


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model for f in FAMILIES])
def test_taylor_prune_prunes_every_family_it_claims_and_refuses_the_others_in_one_line(family, taylor_prune_column):
    """A pruned family: its groups found by the builders, by discovery or both, with Q/K, V and FFN groups, and
    one step to half the MACs; any other: a refusal naming what it cannot split, never a crash."""
    cell = taylor_prune_column.at[family.model, "taylor_prune"]
    if family.pruned:
        found = re.fullmatch(r"yes: (builders|discovered|builders \+ discovered): (\d+) Q/K, (\d+) V, (\d+) FFN, "
                             r"(\d+) width; one step to (0\.\d\d) of the MACs", cell)
        assert found and int(found[2]) == int(found[3]) > 0 and int(found[4]) > 0, cell
        assert float(found[6]) <= 0.55, cell
    else:
        assert cell.startswith("no: ") and "\n" not in cell, cell


def _column(table: str, name: str) -> dict[str, str]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    header = rows[0]
    return {row[0]: row[header.index(name)] for row in rows[2:]}


@pytest.mark.parametrize("analysis", ANALYSES)
def test_readme_table_says_what_each_analysis_does(analysis, request):
    column = request.getfixturevalue(f"{analysis}_column")
    readme = _column(readme_table(README), analysis)
    assert readme == {f"{f.name} (`{f.model}`)": short_cell(column.at[f.model, analysis]) for f in FAMILIES}


def test_cli_writes_tables_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\noutro\n")
    df = main(["--models", "resnet18", "--analyses", "head_similarity,taylor_prune", "--out", str(tmp_path)])
    assert df.head_similarity.iat[0].startswith("no: ResNet has no softmax attention")
    assert pd.read_csv(tmp_path / "support_matrix.csv").taylor_prune.iat[0].startswith("no: ")
    table = (tmp_path / "support_matrix.md").read_text()
    replace_readme_table(readme, table)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\noutro\n") and "old table" not in text
    assert readme_table(readme) == table


@pytest.mark.parametrize("argv, message", [
    (["--models", "no_such_model"], "unknown or missing models/analyses: no_such_model"),
    (["--analyses", "fig9"], "unknown or missing models/analyses: fig9"),
    (["--models", "resnet18", "--readme", "README.md"], "--readme needs the whole matrix"),
])
def test_cli_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
