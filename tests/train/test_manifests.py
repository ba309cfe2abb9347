"""Corpus manifests: the sources file, slide/tile CSVs, and `gpfm-train manifest build|validate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpfm_train.data.manifests import (
    SUPPORTED_KEYWORDS,
    SlideRow,
    TileRow,
    build_slide_manifest,
    load_slide_manifest,
    load_sources,
    load_tile_manifest,
    schema_errors,
    validate_manifest_file,
    write_manifest,
)
from gpfm_train.data.schema import SCHEMA, schema_json
from gpfm_train.manifest_cli import main
from napari_gpfm.errors import ConfigError
from napari_gpfm.tiling import TilingSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "src-manifest"
SLIDE_HEADER = "slide_path,mpp,n_tiles,spec_id,source,organ,split\n"
TILE_HEADER = "slide_path,x,y,tile_size_l0,mpp,read_size\n"


# ---------------------------------------------------------------------------- sources.yaml


def test_sources_file_validates_and_its_totals_are_the_notes():
    src = load_sources(SRC / "sources.yaml")
    assert len(src.records) == 70
    assert src.total_patches == src.totals["patches"] == 189_254_712
    assert src.total_slides == src.totals["slides"] == 51_828
    names = {r.name: r for r in src.records}
    assert names["TCGA-frozen1"].patches == 17_491_307 and names["TCGA-frozen1"].slides == 9_639
    assert names["PANDA"].slides == 10_202 and names["PANDA"].organ == "prostate"
    assert names["Osteosarcoma-Tumor"].patches == 1_391 and names["Osteosarcoma-Tumor"].slides == 0
    assert {r.modality for r in src.records if r.slides == 0} == {"ROI"}
    assert sum(r.slides == 0 for r in src.records) == 9
    for r in src.records:
        assert r.url == "unknown" or r.url.startswith(("http://", "https://"))
        assert r.licence and r.citation and r.access  # "unknown" where not known


def test_schema_file_is_the_packaged_schema_and_is_valid_json_schema():
    assert (SRC / "schema.json").read_text(encoding="utf-8") == schema_json()
    used = set()

    def walk(schema):
        for key, value in schema.items():
            used.add(key)
            if key in ("properties", "$defs"):
                for sub in value.values():
                    walk(sub)
            elif key == "items":
                walk(value)

    walk(SCHEMA)
    assert used <= SUPPORTED_KEYWORDS | {"description"}
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_built_in_validator_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    data = yaml.safe_load((SRC / "sources.yaml").read_text(encoding="utf-8"))
    root = {**SCHEMA, "$ref": "#/$defs/sources"}
    assert not list(jsonschema.Draft202012Validator(root).iter_errors(data))
    assert schema_errors(data, SCHEMA["$defs"]["sources"]) == []
    broken = json.loads(json.dumps(data))
    broken["sources"][4]["slides"] = -1
    broken["sources"][5]["modality"] = "slides"
    broken["sources"][6]["url"] = "ftp://nowhere"
    del broken["sources"][7]["citation"]
    broken["sources"][8]["extra"] = 1
    theirs = {
        tuple(e.absolute_path) for e in jsonschema.Draft202012Validator(root).iter_errors(broken)
    }
    ours = {path for path, _ in schema_errors(broken, SCHEMA["$defs"]["sources"])}
    # jsonschema reports a missing or unknown field at its parent object; ours names the field.
    assert {p[:2] for p in theirs} == {p[:2] for p in ours} == {("sources", i) for i in range(4, 9)}
    assert len(ours) == 5


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_broken_yaml_names_the_line_and_column(tmp_path):
    text = (SRC / "sources.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.strip() == '- name: "TCGA BRCA"')
    lines[i] = '  - name: "TCGA BRCA'  # unterminated quote, wrong indent
    path = _write(tmp_path, "broken.yaml", "\n".join(lines))
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+, column \d+: not valid YAML"):
        load_sources(path)


def test_a_wrong_field_names_file_line_field_and_record(tmp_path):
    text = (SRC / "sources.yaml").read_text(encoding="utf-8")
    text = text.replace("patches: 9892548", 'patches: "lots"', 1)
    path = _write(tmp_path, "bad.yaml", text)
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if '"lots"' in ln)
    with pytest.raises(ConfigError) as err:
        load_sources(path)
    msg = str(err.value)
    assert f"bad.yaml: line {line}, column 14: sources[3].patches (TCGA BRCA)" in msg
    assert msg.endswith("must be an integer, got 'lots'")
    assert "\n" not in msg


def test_totals_must_be_the_sums(tmp_path):
    text = (SRC / "sources.yaml").read_text(encoding="utf-8")
    path = _write(tmp_path, "t.yaml", text.replace("patches: 189254712", "patches: 190000000"))
    with pytest.raises(
        ConfigError,
        match=r"totals\.patches is 190,000,000 but the sources sum to "
        r"189,254,712",
    ):
        load_sources(path)
    path = _write(tmp_path, "e.yaml", "# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_sources(path)


# ---------------------------------------------------------------------------- CSV manifests


def test_slide_manifest_round_trip(tmp_path):
    rows = [
        SlideRow("slides/a.svs", None, 12, "0123456789ab", "TCGA BRCA", "breast", "train"),
        SlideRow("/abs/b.tif", 0.25, 3, "0123456789ab", None, None, "test"),
    ]
    path = write_manifest(rows, tmp_path / "m.csv")
    assert path.read_text().splitlines()[0] + "\n" == SLIDE_HEADER
    assert load_slide_manifest(path) == rows
    assert not [p for p in tmp_path.iterdir() if p.name != "m.csv"]  # no temporary left


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("a.svs,,many,0123456789ab,,,train\n", r"line 3, column 'n_tiles': must be a whole number"),
        ("a.svs,-1,4,0123456789ab,,,train\n", r"line 3, column 'mpp': must be at least 0.01"),
        ("a.svs,,4,XYZ,,,train\n", r"line 3, column 'spec_id': .* does not match"),
        ("a.svs,,4,0123456789ab,,,holdout\n", r"line 3, column 'split': must be one of"),
        (",,4,0123456789ab,,,train\n", r"line 3, column 'slide_path': must not be empty"),
        ("a.svs,,4,0123456789ab,,train\n", r"line 3: has 6 cells but the header has 7"),
        (
            "b.svs,,4,0123456789ab,,,train\n",
            r"line 3, column 'slide_path': b.svs is already listed",
        ),
    ],
)
def test_a_bad_slide_row_names_file_line_and_column(tmp_path, body, pattern):
    path = _write(tmp_path, "slides.csv", SLIDE_HEADER + "b.svs,,4,0123456789ab,,,train\n" + body)
    with pytest.raises(ConfigError, match=r"slides\.csv: " + pattern):
        load_slide_manifest(path)


def test_headers_and_empty_manifests(tmp_path):
    path = _write(tmp_path, "h.csv", "slide_path,mpp,n_tiles,spec_id,source,organ\na,,1,x,,\n")
    with pytest.raises(ConfigError, match=r"h\.csv: line 1: the header misses column\(s\) split"):
        load_slide_manifest(path)
    path = _write(tmp_path, "u.csv", SLIDE_HEADER.strip() + ",colour\n")
    with pytest.raises(ConfigError, match=r"unknown column\(s\) colour"):
        load_slide_manifest(path)
    with pytest.raises(ConfigError, match=r"e\.csv is empty"):
        load_slide_manifest(_write(tmp_path, "e.csv", ""))
    with pytest.raises(ConfigError, match=r"o\.csv lists no rows"):
        load_slide_manifest(_write(tmp_path, "o.csv", SLIDE_HEADER + "\n\n"))
    with pytest.raises(ConfigError, match="no rows to write"):
        write_manifest([], tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()


def test_tile_manifest_rows_and_calibration_check(tmp_path):
    good = TILE_HEADER + "s.svs,0,0,224.4,0.5,224\ns.svs,224,0,224.4,0.5,224\n"
    rows = load_tile_manifest(_write(tmp_path, "t.csv", good))
    assert rows[1] == TileRow("s.svs", 224, 0, 224.4, 0.5, 224)
    assert rows[0].slide_mpp == pytest.approx(0.5 * 224 / 224.4)
    bad = good + "s.svs,448,0,448,0.5,224\n"
    with pytest.raises(ConfigError, match=r"t2\.csv: line 4, column 'tile_size_l0': .* line 2"):
        load_tile_manifest(_write(tmp_path, "t2.csv", bad))
    with pytest.raises(ConfigError, match=r"line 2, column 'x': must be at least 0"):
        load_tile_manifest(_write(tmp_path, "t3.csv", TILE_HEADER + "s.svs,-5,0,224,0.5,224\n"))


# ---------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, extra_he_dir, sample_slide_path):
    """A copy of data/extra-he plus the sample slide (twice) and one broken slide file."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(extra_he_dir, root / "extra-he")
    shutil.copy(sample_slide_path, root / "extra-he" / sample_slide_path.name)
    (root / "extra-he" / "copies").mkdir()
    shutil.copy(sample_slide_path, root / "extra-he" / "copies" / "renamed.svs")
    (root / "extra-he" / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    return root


@pytest.fixture(scope="module")
def built(corpus):
    spec = TilingSpec()
    return (
        build_slide_manifest(corpus / "extra-he", spec, root=corpus),
        build_slide_manifest(corpus / "extra-he", spec, root=corpus, default_mpp=0.5),
    )


def test_build_counts_tissue_tiles_and_skips_what_it_cannot_tile(built, sample_slide_path):
    from napari_gpfm.slides import open_slide
    from napari_gpfm.tiling import make_grid

    plain, with_default = built
    rows = {r.slide_path: r for r in plain.rows}
    assert set(rows) == {
        "extra-he/CMU-1-Small-Region.svs",
        "extra-he/openslide_os1_crop/OS-1-detail.ome.tif",
    }
    with open_slide(sample_slide_path) as slide:
        assert rows["extra-he/CMU-1-Small-Region.svs"].n_tiles == len(
            make_grid(slide, TilingSpec())
        )
    assert all(r.mpp is None and r.spec_id == TilingSpec().id for r in plain.rows)
    skipped = dict(plain.skipped)
    assert (
        "--default-mpp" in skipped["extra-he/histolab_fixtures/slides/tcga-cr-7395-01a-01-ts1.svs"]
    )
    assert "broken.svs" in "".join(skipped)  # reported, not fatal
    # A renamed copy would count the same tiles twice.
    assert skipped["extra-he/copies/renamed.svs"] == (
        "the same slide as extra-he/CMU-1-Small-Region.svs (identical content), listed once")

    tcga = {r.slide_path: r for r in with_default.rows}[
        "extra-he/histolab_fixtures/slides/tcga-cr-7395-01a-01-ts1.svs"
    ]
    assert tcga.mpp == 0.5 and tcga.n_tiles > 20
    assert with_default.n_tiles == plain.n_tiles + tcga.n_tiles


def test_cli_build_writes_a_valid_csv_and_prints_a_summary(corpus, tmp_path, capsys):
    out = tmp_path / "out" / "slides.csv"
    code = main(
        [
            "manifest",
            "build",
            str(corpus / "extra-he"),
            "--out",
            str(out),
            "--default-mpp",
            "0.5",
            "--root",
            str(corpus),
            "--organ",
            "mixed",
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 slide(s)" in printed and "skipped" in printed and f"wrote {out}" in printed
    rows = load_slide_manifest(out)
    assert len(rows) == 3 and {r.organ for r in rows} == {"mixed"}
    assert [p.name for p in out.parent.iterdir()] == ["slides.csv"]
    assert main(["manifest", "validate", str(out), "--root", str(corpus), "--check-files"]) == 0
    assert "valid slide manifest: 3 slides" in capsys.readouterr().out
    assert main(["manifest", "validate", str(out), "--check-files"]) == 2  # wrong root
    assert "not found" in capsys.readouterr().err


def test_cli_build_with_nothing_to_tile_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "slides.csv"
    assert main(["manifest", "build", str(empty), "--out", str(out)]) == 2
    assert "no slide files" in capsys.readouterr().err and not out.exists()
    (empty / "x.svs").write_text("not a slide")
    assert main(["manifest", "build", str(empty), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 1 slide(s) could be tiled") and not out.exists()
    assert main(["manifest", "build", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # An --out that cannot be written is refused before a single slide is tiled.
    assert main(["manifest", "build", str(empty), "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the manifest" in err and "x.svs" not in err


def test_cli_validate_sources_and_a_broken_csv(tmp_path, capsys):
    assert main(["manifest", "validate", str(SRC / "sources.yaml")]) == 0
    assert "70 sources, 51,828 slides, 189,254,712 patches" in capsys.readouterr().out
    bad = _write(tmp_path, "bad.csv", SLIDE_HEADER + "a.svs,,x,0123456789ab,,,train\n")
    assert main(["manifest", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.csv: line 2, column 'n_tiles'" in err
    assert "\n" not in err
    odd = _write(tmp_path, "odd.csv", "a,b\n1,2\n")
    assert main(["manifest", "validate", str(odd)]) == 2
    assert "cannot tell what manifest" in capsys.readouterr().err


def test_the_example_manifest_lists_the_repository_slides():
    rows = load_slide_manifest(SRC / "slides.example.csv")
    assert len(rows) >= 3 and all(r.n_tiles > 0 for r in rows)
    assert "napari_gpfm/data/CMU-1-Small-Region.svs" in {r.slide_path for r in rows}
    summary = validate_manifest_file(SRC / "slides.example.csv", root=REPO_ROOT, check_files=True)
    assert "valid slide manifest" in summary
    assert {r.spec_id for r in rows} == {TilingSpec().id}, (
        "the example is stale for the default tiling spec; from the repository root run "
        "`python -m gpfm_train.manifest_cli manifest build data/extra-he "
        "napari_gpfm/data/CMU-1-Small-Region.svs --default-mpp 0.5 --out src-manifest/slides.example.csv`"
    )
