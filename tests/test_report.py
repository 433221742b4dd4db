"""Reports built from hand-written results files (tests/data): files, numbers, figures, errors, CLI.

Expected numbers are read from the fixture JSON and compared with what the report prints, never
recomputed the way the report computes them.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from palm_eval import cli, plots
from palm_eval.errors import PalmEvalError
from palm_eval.report import build_report

DATA = Path(__file__).parent / "data"
FILES = [DATA / "results_tiny_xpos.json", DATA / "results_tiny_rope.json", DATA / "results_tiny_xpos_window256.json"]
FIGURES = ["perplexity_vs_length", "loss_by_position", "passkey", "throughput_memory"]
METRICS_HEADER = ["Task", "Metric", "Model", "Value", "Scored", "Non-finite"]
NOT_METRICS = {"length", "stride", "scored_tokens", "scored_bytes", "nonfinite_tokens", "nonfinite", "sequences",
               "count", "trials", "distractors", "seed"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def split_run() -> dict:
    """tiny xpos at 8k, as if evaluated in a second run on another machine: merges into the same curve."""
    run = load(FILES[0])
    result = copy.deepcopy(load(FILES[2])["results"]["c4_ppl_8k"])
    result.update(nll=4.9124, perplexity=135.96, bits_per_byte=1.6441, nonfinite_tokens=0)
    run["results"] = {"c4_ppl_8k": result}
    run["details"], run["timing"] = {}, {}
    run["run"].update(device="cuda:0 (NVIDIA H200)", seed=7)
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return build_report([*FILES, split_run()], tmp_path_factory.mktemp("report"), title="Fixture report")


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif current:
            tables.append([row for row in current if not set("".join(row)) <= set("-:")])
            current = []
    return tables


class TableParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def html_tables(text: str) -> list[list[list[str]]]:
    parser = TableParser()
    parser.feed(text)
    return parser.tables


def table_with_header(tables, header: list[str]) -> list[list[str]]:
    matches = [t for t in tables if t and t[0][: len(header)] == header]
    assert len(matches) == 1, f"expected one table headed {header}"
    return matches[0]


def number(cell: str) -> float:
    return float(cell.replace(",", "").replace("†", "").strip())


def expected_metrics() -> dict[tuple[str, str, str], tuple]:
    """(task, metric, label) -> (value, scored, nonfinite) for every numeric or null metric in the inputs."""
    out = {}
    for run in [load(f) for f in FILES] + [split_run()]:
        for task, res in run["results"].items():
            scored = res.get("scored_tokens", res.get("count", res.get("trials")))
            nonfinite = res.get("nonfinite_tokens", res.get("nonfinite"))
            for metric, value in res.items():
                is_metric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
                if is_metric and metric not in NOT_METRICS:
                    out[(task, metric, run["model"]["label"])] = (value, scored, nonfinite)
    return out


def check_metrics_table(rows: list[list[str]]) -> None:
    assert rows[0] == METRICS_HEADER
    expected = expected_metrics()
    seen = {}
    for task, metric, label, value, scored, nonfinite in rows[1:]:
        seen[(task, metric, label)] = (value, scored, nonfinite)
    assert set(seen) == set(expected)
    for key, (value, scored, nonfinite) in expected.items():
        shown_value, shown_scored, shown_nonfinite = seen[key]
        if value is None:
            assert shown_value == "non-finite", key
        else:
            assert math.isclose(number(shown_value), value, rel_tol=5e-3, abs_tol=5e-4), (key, shown_value, value)
        assert number(shown_scored.split()[0]) == scored, key
        assert (shown_nonfinite == "") if nonfinite is None else (number(shown_nonfinite) == nonfinite), key


def test_report_files(report):
    out = report.parent
    assert report == out / "report.md"
    assert (out / "report.html").is_file()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(f"{s}.{e}" for s in FIGURES for e in ("png", "svg"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_pngs_are_valid_images(report):
    import matplotlib.image

    for stem in FIGURES:
        data = (report.parent / "figures" / f"{stem}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert 600 <= width <= 4000 and 300 <= height <= 4000, (stem, width, height)
        assert matplotlib.image.imread(report.parent / "figures" / f"{stem}.png").shape[:2] == (height, width)
        assert b"Software" not in data  # no version string: regenerated reports don't churn


def test_svgs_parse_and_carry_no_date(report):
    for stem in FIGURES:
        path = report.parent / "figures" / f"{stem}.svg"
        assert ET.parse(path).getroot().tag.endswith("svg")
        assert "<dc:date>" not in path.read_text()


def test_markdown_metrics_table_holds_the_json_numbers(report):
    check_metrics_table(table_with_header(markdown_tables(report.read_text()), METRICS_HEADER))


def test_html_is_self_contained_and_its_tables_hold_the_json_numbers(report):
    page = (report.parent / "report.html").read_text()
    check_metrics_table(table_with_header(html_tables(page), METRICS_HEADER))
    assert page.count('src="data:image/svg+xml;base64,') == len(FIGURES)
    assert "figures/" not in page and "http" not in page


def test_perplexity_table_marks_nonfinite_points_and_merges_split_runs(report):
    rows = table_with_header(markdown_tables(report.read_text()), ["Length"])
    header = rows[0]
    assert header[:2] == ["Length", "× training length"]
    assert header[2:] == ["tiny xpos", "tiny rope", "tiny xpos window=256"]
    table = {number(r[0]): dict(zip(header, r)) for r in rows[1:]}
    assert sorted(table) == [256, 512, 1024, 2048, 4096, 8192]
    for path in FILES:
        run = load(path)
        label = run["model"]["label"]
        for res in run["results"].values():
            if res["task_type"] != "perplexity":
                continue
            cell = table[res["length"]][label]
            if res["perplexity"] is None:
                assert cell == "non-finite"
            else:
                assert math.isclose(number(cell), res["perplexity"], rel_tol=5e-3)
                assert cell.endswith("†") == (res["nonfinite_tokens"] > 0)
    assert table[8192]["× training length"] == "16×"
    split = split_run()["results"]["c4_ppl_8k"]["perplexity"]
    assert math.isclose(number(table[8192]["tiny xpos"]), split, rel_tol=5e-3)
    assert table[256]["tiny xpos window=256"] == "—"


def test_summary_states_measurements(report):
    text = report.read_text()
    assert ("c4_ppl, tiny rope: perplexity rises from 51.18 at 512 tokens (1× its training length) to 261.5 at 2k "
            "tokens (4×); at 4k tokens no scored token had a finite loss (perplexity undefined); at 2k tokens 3 token "
            "losses were non-finite and are excluded from the mean.") in text
    assert ("c4_ppl, tiny xpos window=256: perplexity falls from 52.74 at 512 tokens (1× its training length) to "
            "41.23 at 8k tokens (16×).") in text
    assert "differs between runs" not in text  # the fixtures were evaluated on the same data


def test_run_metadata_one_column_per_file(report):
    rows = table_with_header(markdown_tables(report.read_text()), ["Field"])
    assert len(rows[0]) == 1 + len(FILES) + 1
    assert rows[0][1:3] == ["tiny xpos (results_tiny_xpos.json)", "tiny rope"]
    fields = {r[0]: r[1:] for r in rows[1:]}
    for i, path in enumerate(FILES):
        info = load(path)["run"]
        column = i
        assert fields["command"][column] == info["command"]
        assert fields["git commit"][column] == info["git_commit"]
        assert fields["seed"][column] == str(info["seed"])
        assert fields["device"][column] == info["device"]
        assert fields["dtype"][column] == info["dtype"]
        assert number(fields["wall time (s)"][column]) == info["wall_time_s"]
        assert f"torch {info['versions']['torch']}" in fields["versions"][column]
    assert fields["device"][3] == "cuda:0 (NVIDIA H200)"
    fingerprints = table_with_header(markdown_tables(report.read_text()), ["Task", "Data fingerprint"])
    expected = load(FILES[0])["results"]["c4_ppl_2k"]["data_fingerprint"]
    assert [r[1] for r in fingerprints if r[0] == "c4_ppl_2k"] == [expected]


def test_nonfinite_perplexity_is_drawn_as_a_cross_not_dropped():
    from palm_eval.report import _load, _perplexity_frame

    runs = [_load(path, i) for i, path in enumerate(FILES)]
    style_of = plots.styles([run.label for run in runs])
    with plots.style():
        fig = plots.perplexity_vs_length(_perplexity_frame(runs), style_of, {run.label: 512 for run in runs})
    crosses = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in crosses] == [[4096]]
    assert crosses[0].get_color() == style_of["tiny rope"]["color"]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "non-finite" in texts


def test_overflowing_perplexity_is_not_called_undefined():
    from palm_eval.report import _load, _perplexity_frame, _perplexity_sentences

    data = load(FILES[1])
    data["results"]["c4_ppl_2k"].update(nll=712.4, perplexity=None, bits_per_byte=238.5, nonfinite_tokens=0)
    run = _load(data, 0)
    [sentence] = _perplexity_sentences(_perplexity_frame([run]), ["tiny rope"], {"tiny rope": 512})
    assert sentence == (
        "c4_ppl, tiny rope: perplexity rises from 51.18 at 512 tokens (1× its training length) to 67.95 at 1k tokens "
        "(2×); at 4k tokens no scored token had a finite loss (perplexity undefined); at 2k tokens the mean NLL is "
        "712.4 nats, too large for its exp to be represented (perplexity not finite).")


def test_differing_data_is_reported(tmp_path):
    runs = [load(FILES[0]), load(FILES[1])]
    runs[1]["results"]["c4_ppl_1k"]["data_fingerprint"] = "sha256:0000"
    for run in runs:  # keep the build small: the note is what is tested
        run["results"] = {"c4_ppl_1k": run["results"]["c4_ppl_1k"]}
        run["details"], run["timing"] = {}, {}
    text = build_report(runs, tmp_path).read_text()
    assert "c4_ppl_1k: data_fingerprint differs between runs" in text


def small_run(tmp_path: Path, timing: bool) -> Path:
    """The windowed run at two lengths, without details: a quick build for the tests of writing files."""
    data = load(FILES[2])
    data["results"] = {t: data["results"][t] for t in ("c4_ppl_512", "c4_ppl_1k")}
    data["details"] = {}
    data["timing"] = {t: data["timing"][t] for t in data["results"]} if timing else {}
    return write(tmp_path, "small.json", json.dumps(data))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mutated(change) -> str:
    data = load(FILES[2])
    change(data)
    return json.dumps(data)


BAD_INPUTS = {
    "truncated": (lambda: FILES[2].read_text()[:500], "not valid JSON"),
    "wrong_schema": (lambda: mutated(lambda d: d.update(schema="palm-eval/results/v0")), "schema is"),
    "infinity": (lambda: FILES[2].read_text().replace('"perplexity": 41.235', '"perplexity": Infinity'),
                 "results.c4_ppl_8k.perplexity is inf; results must write null"),
    "no_family": (lambda: mutated(lambda d: d["results"]["c4_ppl_1k"].pop("family")),
                  "results.c4_ppl_1k has no 'family'"),
    "length_text": (lambda: mutated(lambda d: d["results"]["c4_ppl_1k"].update(length="1k")),
                    "results.c4_ppl_1k.length must be an integer"),
    "ragged_buckets": (lambda: mutated(lambda d: d["details"]["c4_ppl_1k"]["loss_by_position"]["nll"].pop()),
                       "details.c4_ppl_1k.loss_by_position needs lists"),
    "no_results": (lambda: mutated(lambda d: d.update(results={})), "results is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, case):
    text, message = BAD_INPUTS[case]
    path = write(tmp_path, f"{case}.json", text())
    with pytest.raises(PalmEvalError) as err:
        build_report([FILES[0], path], tmp_path / "out")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_file_and_duplicate_results_are_errors(tmp_path):
    with pytest.raises(PalmEvalError, match="no such file"):
        build_report([tmp_path / "nope.json"], tmp_path / "out")
    with pytest.raises(PalmEvalError, match=r"both hold results of 'tiny xpos' on 'c4_ppl_256'"):
        build_report([FILES[0], FILES[0]], tmp_path / "out")


def test_rebuild_replaces_figures_keeps_other_files_and_survives_failure(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    (out / "results.json").write_text("{}")
    small = small_run(tmp_path, timing=True)
    build_report([small], out)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{s}.{e}" for s in ("perplexity_vs_length", "throughput_memory") for e in ("png", "svg"))
    assert (out / "results.json").read_text() == "{}"
    assert (out / "report.md").stat().st_mode & 0o044 == 0o044  # readable by others, like any shared document
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(plots, "throughput_memory", broken)
    with pytest.raises(RuntimeError):
        build_report([small], out, title="another title")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli(tmp_path, capsys):
    small = small_run(tmp_path, timing=False)
    assert cli.main(["report", str(small), "--output-dir", str(tmp_path / "r"), "--title", "Window run"]) == 0
    assert (tmp_path / "r" / "report.md").read_text().startswith("# Window run\n")
    assert "report written" in capsys.readouterr().out
    bad = write(tmp_path, "bad.json", "{")
    assert cli.main(["report", str(bad), "--output-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not valid JSON") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(small)])  # --output-dir is required
    assert exit_.value.code == 2
