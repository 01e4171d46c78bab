"""docs/OPERATIONS.md against the code it documents: its settings table is the Settings class
(every field, by its environment variable, with its default), its metrics table is every
metric the service exposes, and its relative links lead to files that exist. A setting or a
metric added without documenting it fails here."""

import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from wallet import metrics
from wallet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
SETTINGS_HEADER = ("variable", "default", "meaning")
METRICS_HEADER = ("metric", "type", "labels", "what it counts")
# Variables the doc's settings table lists that are not Settings fields, with their defaults.
READ_ELSEWHERE = {"PROMETHEUS_MULTIPROC_DIR": "unset"}  # by `wallet serve` and prometheus-client
UNSET = "unset"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(header: tuple[str, ...]) -> list[list[str]]:
    """The rows of the one Markdown table in OPERATIONS.md whose header is `header`."""
    lines = OPERATIONS.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if tuple(_cells(line)) == header]
    assert len(starts) == 1, f"OPERATIONS.md has {len(starts)} tables headed {header}"
    rows: list[list[str]] = []
    for line in lines[starts[0] + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"a row of the {header[0]} table: {line}"
        rows.append(cells)
    return rows


def _code(cell: str) -> str:
    """A cell's text without the backticks of inline code."""
    return cell.removeprefix("`").removesuffix("`")


def environment_variable(name: str, field: FieldInfo) -> str:
    """The variable a field is read from: its alias, else the prefix and its name in capitals."""
    if isinstance(field.validation_alias, str):
        return field.validation_alias
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def rendered_default(field: FieldInfo) -> str:
    """A default as the doc shows it: as one would write it in the variable (secrets
    unwrapped, booleans in lower case), `unset` for None."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    rows = _table(SETTINGS_HEADER)
    documented = {_code(variable): _code(default) for variable, default, _ in rows}
    assert len(documented) == len(rows), "a variable is listed twice"
    expected = {
        environment_variable(name, field): rendered_default(field)
        for name, field in Settings.model_fields.items()
    } | READ_ELSEWHERE

    assert documented == expected
    assert all(meaning for _, _, meaning in rows), "every setting says what it means"


def test_the_documented_defaults_set_as_variables_give_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The doc's defaults are what an operator may write: setting every variable to the value
    the table shows (and removing the unset ones) gives the class's own defaults."""
    documented = {
        _code(variable): _code(default) for variable, default, _ in _table(SETTINGS_HEADER)
    }
    for name, field in Settings.model_fields.items():
        variable = environment_variable(name, field)
        if documented[variable] == UNSET:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, documented[variable])

    assert Settings() == Settings.model_construct()


def _metrics() -> dict[str, str]:
    """Every metric of wallet.metrics as it is exposed: name (counters with `_total`) -> type."""
    exposed: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.collect():
                suffix = "_total" if family.type == "counter" else ""
                exposed[family.name + suffix] = family.type
    return exposed


def test_the_metrics_table_lists_every_metric_with_its_type() -> None:
    documented = {_code(name): kind for name, kind, _, _ in _table(METRICS_HEADER)}
    assert documented == _metrics()


def test_the_relative_links_lead_to_files_that_exist() -> None:
    text = OPERATIONS.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    relative = [t for t in targets if "://" not in t]
    assert relative, "the doc links the alert rules, the dashboard and SCALING.md"
    missing = [t for t in relative if not (OPERATIONS.parent / t).resolve().exists()]
    assert not missing, f"links to files that do not exist: {missing}"
