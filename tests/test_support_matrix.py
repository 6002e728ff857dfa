"""The README's support matrix is the one the registries generate, so it cannot drift."""

from pathlib import Path

from visionselector.adapters import ADAPTERS, support_matrix
from visionselector.cli import main
from visionselector.methods import get_method_class, list_methods

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def test_readme_matrix_is_generated_from_the_registries():
    text = README.read_text()
    assert START in text and END in text, "README.md lacks the support-matrix markers"
    shipped = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert shipped == support_matrix().strip(), (
        "README.md's support matrix is stale; replace it with the output of `visionselector methods --matrix`")


def test_matrix_has_a_row_per_family_and_a_reason_for_every_refusal():
    matrix = support_matrix()
    for family, adapter in ADAPTERS.items():
        row = next(line for line in matrix.splitlines() if line.startswith(f"| `{family}` |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
        assert len(cells) == len(list_methods())
        for method, cell in zip(sorted(list_methods()), cells):
            reason = adapter.refusal(get_method_class(method))
            assert (cell == "yes") == (reason is None)
            if reason is not None:
                assert reason in matrix


def test_cli_prints_the_matrix(capsys):
    assert main(["methods", "--matrix"]) == 0
    assert capsys.readouterr().out.strip() == support_matrix().strip()
