"""``rgae explain-dataset`` and ``rgae evaluate`` end to end on real (tiny random or shipped) models: failures are
recorded, settings are checked, stores resume to exactly the uninterrupted result, two real processes give the maps
of one, and the evaluation reproduces ``examples/shapes_table.py``'s pointing game."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rgae import Explanation, ExplanationStore
from rgae.cli import main
from tests.test_datasets import assert_same_explanation

ROOT = Path(__file__).resolve().parents[1]
MAP_FIELDS = ("text_to_patch", "text_to_query", "query_to_patch", "token_probs", "input_ids", "pixel_values")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random shapes-world deco model saved as a model folder (what --model takes)."""
    from rgae.commands.demo import tiny_random_model

    folder = tmp_path_factory.mktemp("tiny-mlp")
    model, processor = tiny_random_model("mlp2x_gelu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A JSONL dataset: 4 shapes scenes as PNG files, a corrupt image, a missing image, a too-long target."""
    from PIL import Image

    from deco_models.data.shapes_dataset import read_shapes
    from rgae.datasets import record_to_json

    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    lines = []
    for r in read_shapes("5:4"):
        Image.fromarray(r.image).save(folder / "images" / f"{r.id}.png")
        Image.fromarray(r.mask.astype(np.uint8)).save(folder / "masks" / f"{r.id}.png")
        r.image, r.mask = f"images/{r.id}.png", f"masks/{r.id}.png"
        lines.append(record_to_json(r))
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines.append({"id": "corrupt", "image": "images/corrupt.png", "text": "a red circle"})
    lines.append({"id": "missing", "image": "images/nowhere.png", "text": "a red circle"})
    lines.append({"id": "long", "image": "images/000000.png", "text": " ".join(["red"] * 600)})
    (folder / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "d.jsonl"


def _assert_same_maps(a: ExplanationStore, b: ExplanationStore) -> None:
    assert a.ids() == b.ids() and a.failures == b.failures
    for rid in a:
        x, y = a[rid], b[rid]
        for f in MAP_FIELDS:
            assert torch.equal(getattr(x, f), getattr(y, f)), (rid, f)


def _shard_ids(store: Path) -> list[str]:
    ids = []
    for f in (store / "shards").glob("*.json"):
        index = json.loads(f.read_text())
        ids += [*index["records"], *index["failures"]]
    return ids


def explain(model, data, out, *extra) -> int:
    return main(["explain-dataset", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
                 *map(str, extra)])


# --------------------------------------------------------------------------------------------------- explain-dataset


def test_failures_are_recorded_counted_and_resumed(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "s"
    assert explain(tiny_model, data, out, "--batch-records", "2") == 0
    printed = capsys.readouterr().out
    assert "explained 4, failed 3, skipped 0" in printed and "4 explanations, 3 failures" in printed
    s = ExplanationStore(out)
    assert s.ids() == ["000000", "000001", "000002", "000003"]
    assert sorted(s.failures) == ["corrupt", "long", "missing"]
    assert "cannot" in s.failures["corrupt"].lower() or "identify" in s.failures["corrupt"].lower()
    assert "nowhere.png" in s.failures["missing"]
    assert "longer than the model's context" in s.failures["long"]
    # The record's annotations travel with the store: boxes, mask (read from its label image) and image size.
    r = s.record("000001")
    assert r.original_hw == (96, 96) and r.mask.shape == (96, 96) and r.boxes[0].label == 1
    # Re-running skips everything; --retry-failed tries the failures again without duplicating anything.
    assert explain(tiny_model, data, out) == 0
    assert "explained 0, failed 0, skipped 7" in capsys.readouterr().out
    assert explain(tiny_model, data, out, "--retry-failed") == 0
    assert "explained 0, failed 3, skipped 4" in capsys.readouterr().out
    assert sorted(ExplanationStore(out).failures) == ["corrupt", "long", "missing"]
    assert len(ExplanationStore(out)) == 4


def test_fail_fast_stops_with_one_line_after_saving(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "s"
    assert explain(tiny_model, data, out, "--fail-fast") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rgae explain-dataset: error: --fail-fast: record 'corrupt' failed: ValueError:")
    assert len(ExplanationStore(out)) == 4  # the records before the failing one are kept


def test_store_holds_what_rgae_explain_writes(tiny_model, data, tmp_path):
    out = tmp_path / "s"
    assert explain(tiny_model, data, out, "--method", "rawattn", "--layer", "mean") == 0
    record = ExplanationStore(out).record("000002")
    single = tmp_path / "single"
    assert main(["explain", "--model", tiny_model, "--image", str(data.parent / "images" / "000002.png"),
                 "--text", record.text, "--prompt", record.prompt, "--method", "rawattn", "--layer", "mean",
                 "--out", str(single)]) == 0
    assert_same_explanation(ExplanationStore(out)["000002"], Explanation.load(single))


def test_other_settings_against_a_store_are_refused(tiny_model, data, tmp_path, capsys):
    from rgae.commands.demo import tiny_random_model

    out = tmp_path / "s"
    assert explain(tiny_model, "shapes:3:2", out) == 0
    capsys.readouterr()
    assert explain(tiny_model, "shapes:3:2", out, "--through-vision") == 2
    assert 'was made with options = {"dtype": "float32", "max_new_tokens": 32, "prompt": null, ' \
           '"through_vision": false}' in capsys.readouterr().err
    assert explain(tiny_model, "shapes:3:2", out, "--method", "gradcam") == 2
    assert "method" in capsys.readouterr().err
    assert explain(tiny_model, "shapes:3:3", out) == 2
    assert "data" in capsys.readouterr().err
    other = tmp_path / "other-model"
    model, processor = tiny_random_model("mlp2x_gelu", seed=1)
    model.save_pretrained(other)
    processor.save_pretrained(other)
    assert explain(other, "shapes:3:2", out) == 2
    assert "was made with another model" in capsys.readouterr().err
    from rgae.datasets.processes import StoreLock

    orphan = StoreLock(out)  # a worker of a killed run, still writing
    orphan.acquire(check_exclusive=False)
    try:
        assert explain(tiny_model, "shapes:3:2", out) == 2
        assert "another run is writing to" in capsys.readouterr().err
    finally:
        orphan.release()
    (tmp_path / "file").write_text("x")
    assert explain(tiny_model, "shapes:3:2", tmp_path / "file") == 2
    assert "is an existing file; give a folder" in capsys.readouterr().err
    assert explain(tiny_model, "nosuch:1", tmp_path / "t") == 2
    assert "unknown scheme" in capsys.readouterr().err
    # Cheap checks, all before a model is loaded, each one line.
    for args, message in (
        ((tmp_path / "none.jsonl", tmp_path / "t"), "none.jsonl: no such file (expected a records file"),
        (("shapes:3:2", tmp_path / "t", "--image-folder", tmp_path / "nope"), "--image-folder"),
        (("shapes:3:2", tmp_path / "t", "--layer", "1"), "--layer is an option of --method rawattn"),
        (("shapes:3:2", tmp_path / "t", "--batch-records", "0"), "--batch-records must be >= 1"),
    ):
        assert explain(tiny_model, *args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["explain-dataset", "--model", "no-such-model", "--data", "shapes:3:2", "--out",
                 str(tmp_path / "t")]) == 2
    assert "neither a zoo model name nor an existing folder" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert len(ExplanationStore(out)) == 2  # untouched


def test_a_shard_cut_off_before_its_index_is_redone(tiny_model, tmp_path, monkeypatch):
    from rgae.datasets import store as store_module

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert explain(tiny_model, "shapes:9:4", whole, "--batch-records", "1") == 0
    real = store_module.write_json_atomic
    calls = {"index": 0}

    def dies_at_second_index(path, value):
        if path.parent.name == "shards":
            calls["index"] += 1
            if calls["index"] >= 2:  # from the second shard on, the tensors reach the disk, the index never does
                raise KeyboardInterrupt
        real(path, value)

    monkeypatch.setattr(store_module, "write_json_atomic", dies_at_second_index)
    with pytest.raises(KeyboardInterrupt):
        explain(tiny_model, "shapes:9:4", cut, "--batch-records", "1")
    monkeypatch.setattr(store_module, "write_json_atomic", real)
    orphans = [f for f in (cut / "shards").glob("*.safetensors") if not f.with_suffix(".json").exists()]
    assert len(orphans) == 1 and len(ExplanationStore(cut)) == 1
    assert explain(tiny_model, "shapes:9:4", cut, "--batch-records", "1") == 0
    assert sorted(_shard_ids(cut)) == ExplanationStore(whole).ids()  # every record exactly once
    assert not orphans[0].exists() or orphans[0].with_suffix(".json").exists()
    _assert_same_maps(ExplanationStore(cut), ExplanationStore(whole))


# ------------------------------------------------------------------------------------------------------ evaluate


def _load_shapes_table():
    spec = importlib.util.spec_from_file_location("shapes_table", ROOT / "examples" / "shapes_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def value(x):
    """shapes_table reports a scene-bootstrap interval around each value; the value itself."""
    return x["value"] if isinstance(x, dict) else x


def test_evaluate_two_stores_every_metric(tiny_model, tmp_path, capsys):
    from deco_models.data.shapes import generate_scene
    from rgae.commands.explain import load_model
    from rgae.metrics import insertion_deletion

    a, b, report = tmp_path / "rgae", tmp_path / "rawattn", tmp_path / "report"
    assert explain(tiny_model, "shapes:12345:5", a) == 0
    assert explain(tiny_model, "shapes:12345:5", b, "--method", "rawattn") == 0
    assert main(["evaluate", str(a), str(b), "--out", str(report), "--steps", "4", "--bootstrap", "200",
                 "--no-progress"]) == 0
    assert "report:" in capsys.readouterr().out
    m = json.loads((report / "metrics.json").read_text())
    assert sorted(m["figures"]) == ["auc-hist.png", "curves.png", "energy-hist.png", "gallery-rawattn.png",
                                    "gallery-rgae.png", "pointing.png"]
    assert all((report / f).stat().st_size > 1000 for f in m["figures"])
    # The pointing game is shapes_table's on the same scenes and model.
    model, processor = load_model(tiny_model)
    table = _load_shapes_table()
    scenes = [generate_scene((12345, i), max_objects=3) for i in range(5)]
    ref = table.explanation_quality(model, processor, scenes, methods=("rgae", "rawattn"), progress=False)

    for name, method in (("rgae", "rgae"), ("rawattn", "rawattn")):
        got = m["summaries"][name]["metrics"]
        assert got["pointing"]["mean"] == value(ref[method]) and got["pointing"]["n"] == value(ref["n_words"])
        assert got["pointing_random"]["mean"] == pytest.approx(value(ref["random"]), abs=1e-12)
        for kind in ("color", "shape"):
            assert m["summaries"][name]["by_kind"][kind]["pointing"]["mean"] == value(ref["by_kind"][method][kind])
        lo, hi = got["pointing"]["ci"]
        assert lo <= got["pointing"]["mean"] <= hi
    # Deletion/insertion are rgae.metrics' curves of each stored explanation.
    store = ExplanationStore(a)
    curves = insertion_deletion(model, processor, store["000003"], steps=4)
    assert m["curves"]["rgae"]["000003"]["deletion"]["scores"] == pytest.approx(curves["deletion"].scores.tolist())
    assert m["summaries"]["rgae"]["metrics"]["insertion_auc"]["n"] == 5
    c = m["comparison"]
    assert (c["a"], c["b"]) == ("rgae", "rawattn") and c["pairs"] == ref["n_words"]
    p = c["metrics"]["pointing"]
    assert p["difference"] == pytest.approx(value(ref["rawattn"]) - value(ref["rgae"])) and 0 < p["p_value"] <= 1
    text = (report / "report.md").read_text()
    assert "## rawattn vs rgae (paired)" in text and "deletion AUC" in text and "![curves](curves.png)" in text


def test_evaluate_usage_errors(tiny_model, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "r"), "--metrics", "pointing"]) == 2
    assert "not an explanation store" in capsys.readouterr().err
    assert explain(tiny_model, "shapes:1:1", tmp_path / "s") == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--metrics", "pointing,auc"]) == 2
    assert "--metrics must be a comma-separated subset" in capsys.readouterr().err
    s = str(tmp_path / "s")
    assert main(["evaluate", s, s, s, "--out", str(tmp_path / "r")]) == 2
    assert "one store, or two" in capsys.readouterr().err
    assert main(["evaluate", s, "--out", str(tmp_path / "r"), "--model", str(tmp_path)]) == 2
    assert "deletion/insertion need the model" in capsys.readouterr().err
    # Only what was asked for is reported (and no model is needed for it).
    assert main(["evaluate", s, "--out", str(tmp_path / "r"), "--metrics", "pointing", "--no-progress"]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["summaries"]["s"]["metrics"]
    assert sorted(m) == ["pointing", "pointing_mask", "pointing_mask_random", "pointing_random"]


# ---------------------------------------------------------------------------------------------------- tiled models


def test_a_tiled_llava_next_store_is_scored_on_the_original_image(tmp_path, capsys):
    # LLaVA-NeXT sees a 40x88 image as a base view + 3 padded tiles: the store keeps each explanation's layout and
    # evaluate scores the words on the original image's pixels, exactly as rgae.metrics' word_* functions do.
    from PIL import Image

    from rgae import RGAE
    from rgae.datasets import explain_dataset, read_dataset
    from rgae.metrics import word_energy_in_box, word_pointing_game, word_random_baseline
    from tests.families.layout_probes import noise_image
    from tests.families.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor

    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for k in range(2):
        Image.fromarray(noise_image((40, 88), seed=k)).save(folder / f"{k}.png")
        lines.append({"id": f"n{k}", "image": f"{k}.png", "text": "a red circle", "prompt": "what",
                      "boxes": [{"words": "red", "box": [50, 0, 88, 40]}, {"words": "circle", "box": [0, 8, 30, 40]}]})
    (folder / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    explainer = RGAE(tiny_llava_next(), tiny_llava_next_processor())
    records = read_dataset(str(folder / "d.jsonl"), str(folder))
    out = tmp_path / "store"
    summary = explain_dataset(explainer, records, out, manifest={"model": "tiny-llava-next", "method": "rgae",
                                                                  "options": {}}, image_folder=str(folder),
                              progress=False)
    assert (summary["explained"], summary["failed"]) == (2, 0)
    store = ExplanationStore(out)
    direct = explainer.attribute(str(folder / "1.png"), target="a red circle", prompt="what")
    assert [v.name for v in store["n1"].layout.views] == ["base", "tile 0,0", "tile 0,1", "tile 0,2"]
    assert torch.equal(store["n1"].image_map(word="red"), direct.image_map(word="red"))
    report = tmp_path / "report"
    assert main(["evaluate", str(out), "--metrics", "pointing,energy", "--out", str(report), "--bootstrap", "50"]) == 0
    capsys.readouterr()
    m = json.loads((report / "metrics.json").read_text())
    got = {(sc["record"], sc["word"]): sc for sc in m["scores"]["store"]}
    assert len(got) == 4
    for r in records:
        expl = store[r.id]
        for box in r.boxes:
            (word,) = box.words
            sc = got[(r.id, word)]
            assert sc["pointing"] == float(word_pointing_game(expl, word, box.box, original_hw=(40, 88)))
            assert sc["energy"] == pytest.approx(word_energy_in_box(expl, word, box.box), abs=1e-12)
            assert sc["pointing_random"] == pytest.approx(word_random_baseline(expl, box.box), abs=1e-12)
    assert "gallery-store.png" in m["figures"]
    # Deletion/insertion perturb one patch grid: refused in one line before any model is loaded.
    assert main(["evaluate", str(out), "--metrics", "deletion", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "several views (base, tile 0,0, tile 0,1, tile 0,2)" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------- explore


def _index_rows(index: Path) -> list[tuple[str, str, list[str]]]:
    """``(href, record id, metric cells)`` of each row of an explorer index, in order."""
    rows = []
    for row in re.findall(r"<tr><td>(.*?)</tr>", index.read_text(), flags=re.S):
        href, rid = re.match(r'<a href="([^"]+)">([^<]*)</a>', row).groups()
        rows.append((href, rid, re.findall(r"<td>([^<]*)</td>", row)))
    return rows


def _header(index: Path) -> list[str]:
    return re.findall(r"<th>([^<]*)</th>", index.read_text())


def test_explore_writes_a_page_per_record_sorted_by_a_metric(tiny_model, tmp_path, capsys):
    from tests.test_explore import page_data

    store_dir, report, site = tmp_path / "s", tmp_path / "report", tmp_path / "site"
    assert explain(tiny_model, "shapes:12345:6", store_dir) == 0
    store = ExplanationStore(store_dir)
    assert main(["explore", str(store_dir), "--out", str(site)]) == 0
    assert "6 pages of 6 records, sorted by pointing" in capsys.readouterr().out
    # Without a report: each record's mean pointing game over its scored words, from the store's boxes.
    assert main(["evaluate", str(store_dir), "--metrics", "pointing,energy", "--out", str(report),
                 "--bootstrap", "50", "--gallery", "0"]) == 0
    capsys.readouterr()
    scores = json.loads((report / "metrics.json").read_text())["scores"]["s"]
    by_record: dict[str, list[dict]] = {}
    for sc in scores:
        by_record.setdefault(sc["record"], []).append(sc)
    mean = {rid: {m: float(np.mean([sc[m] for sc in rows])) for m in ("pointing", "energy")}
            for rid, rows in by_record.items()}
    rows = _index_rows(site / "index.html")
    column = _header(site / "index.html").index("pointing") - 1  # the first header is the record's
    scored = [rid for _, rid, _ in rows if rid in mean]
    assert sorted(rid for _, rid, _ in rows) == store.ids() and len(list((site / "pages").glob("*.html"))) == 6
    assert [mean[r]["pointing"] for r in scored] == sorted(mean[r]["pointing"] for r in scored)
    assert [rid for _, rid, _ in rows][len(scored):] == [r for r in store.ids() if r not in mean]  # unscored last
    for href, rid, cells in rows:
        page = (site / href).read_text()
        assert '<a href="../index.html">' in page
        (data,) = page_data(page)
        assert data["nWords"] == len(store[rid].words) and data["panels"][0]["t2i"]["png"]
        if rid in mean:
            assert float(cells[column]) == pytest.approx(mean[rid]["pointing"], abs=5e-4)
    # With the report: its metrics, another order, the first N only.
    site2 = tmp_path / "site2"
    assert main(["explore", str(store_dir), "--report", str(report), "--sort-by", "energy", "--descending",
                 "--limit", "3", "--out", str(site2)]) == 0
    rows = _index_rows(site2 / "index.html")
    expected = sorted(mean, key=lambda r: -mean[r]["energy"])[:3]
    assert [rid for _, rid, _ in rows] == expected and len(list((site2 / "pages").glob("*.html"))) == 3
    assert "sorted by energy (descending)" in (site2 / "index.html").read_text()


def test_explore_usage_errors(tiny_model, tmp_path, capsys):
    store_dir = tmp_path / "s"
    assert explain(tiny_model, "shapes:3:1", store_dir) == 0
    capsys.readouterr()
    other = tmp_path / "o"
    assert explain(tiny_model, "shapes:4:1", other) == 0
    assert main(["evaluate", str(other), "--metrics", "pointing", "--out", str(tmp_path / "r"), "--gallery", "0",
                 "--bootstrap", "20"]) == 0
    capsys.readouterr()
    for argv, message in (
        ([str(tmp_path / "nothing")], "STORE " + str(tmp_path / "nothing") + ": no such folder"),
        ([str(tmp_path)], "is not an explanation store"),
        ([str(store_dir), "--report", str(tmp_path / "none")], "no such report"),
        ([str(store_dir), "--report", str(tmp_path / "r")], "evaluates " + str(other)),
        ([str(store_dir), "--sort-by", "accuracy"], "--sort-by 'accuracy' is not a metric of the records"),
        ([str(store_dir), "--limit", "0"], "--limit must be >= 1"),
    ):
        assert main(["explore", *argv, "--out", str(tmp_path / "site")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rgae explore: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "site").exists()


# ------------------------------------------------------------------------------------------- processes and kills


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat_file.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def one_thread():
    """Run in-process work with the one thread per process that torchrun / accelerate launch give each worker: CPU
    kernels split their sums by thread count, so bit-identical maps need the same count (sharding is what is
    tested, not thread-count determinism)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_two_accelerate_processes_give_the_maps_of_one(tiny_model, tmp_path, one_thread):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["explain-dataset", "--model", tiny_model, "--data", "shapes:21:40", "--batch-records", "4"]

    def launch(*command):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "rgae.cli", *command]
        proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    printed = launch(*args, "--out", str(two))
    assert "with 2 process(es)" in printed and "explained 40," in printed
    ranks = {json.loads(f.read_text())["rank"] for f in (two / "shards").glob("*.json")}
    assert ranks == {0, 1}  # both processes wrote their share
    assert main([*args, "--out", str(one), "--no-progress"]) == 0
    assert sorted(_shard_ids(two)) == ExplanationStore(one).ids()
    _assert_same_maps(ExplanationStore(two), ExplanationStore(one))
    # The perturbation forwards of `rgae evaluate` shared over two processes give the curves of one.
    evaluate = ["evaluate", str(two), "--metrics", "deletion,insertion", "--steps", "2", "--gallery", "0",
                "--no-progress"]
    launch(*evaluate, "--out", str(tmp_path / "report2"))
    assert main([*evaluate, "--out", str(tmp_path / "report1")]) == 0
    curves = [json.loads((tmp_path / r / "metrics.json").read_text())["curves"] for r in ("report2", "report1")]
    assert list(curves[0]["two"]) == ExplanationStore(one).ids() and curves[0] == curves[1]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path, one_thread):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["explain-dataset", "--model", tiny_model, "--data", "shapes:33:40", "--batch-records", "2",
            "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "rgae.cli", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "shards").glob("*.json"))) < 8:
        time.sleep(0.005)
    for pid in _process_tree(proc.pid):  # the launcher and both workers (each in a session of its own), mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() for pid in _process_tree(proc.pid)[1:]):
        time.sleep(0.05)
    partial = len(ExplanationStore(killed))
    assert 0 < partial < 40, f"the kill did not land mid-run ({partial} records done)"
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(whole)]) == 0
    ids = _shard_ids(killed)
    assert len(ids) == 40 and sorted(ids) == ExplanationStore(whole).ids()  # every record exactly once
    _assert_same_maps(ExplanationStore(killed), ExplanationStore(whole))


@pytest.mark.slow
def test_evaluate_reproduces_the_shapes_table_and_compares_avgpool_with_qformer(tmp_path):
    from deco_models import zoo
    from deco_models.data.shapes import generate_scene
    from deco_models.recipes.shapes_mini import HELDOUT_SEED
    from rgae.commands.demo import load_model

    names = ["shapes-mini-avgpool2_36", "shapes-mini-qformer2_36"]
    if not all(zoo.is_zoo_name(n) for n in names):
        pytest.skip("the avgpool and Q-Former shapes-mini models are not installed")
    n_scenes = 6
    table = _load_shapes_table()
    scenes = [generate_scene((HELDOUT_SEED, i), max_objects=3) for i in range(n_scenes)]
    stores = []
    for name in names:
        stores.append(tmp_path / name)
        assert explain(name, f"shapes:{HELDOUT_SEED}:{n_scenes}", stores[-1]) == 0
    report = tmp_path / "report"
    assert main(["evaluate", *map(str, stores), "--names", "avgpool", "qformer", "--metrics", "pointing,energy",
                 "--out", str(report), "--no-progress"]) == 0
    m = json.loads((report / "metrics.json").read_text())
    refs = {}
    for label, name in zip(("avgpool", "qformer"), names):
        model, processor = load_model(name)
        refs[label] = table.explanation_quality(model, processor, scenes, methods=("rgae",), progress=False)
        got = m["summaries"][label]["metrics"]
        assert got["pointing"]["mean"] == value(refs[label]["rgae"])
        assert got["pointing"]["n"] == value(refs[label]["n_words"])
        assert got["pointing_random"]["mean"] == pytest.approx(value(refs[label]["random"]), abs=1e-12)
        assert {k: v["pointing"]["mean"] for k, v in m["summaries"][label]["by_kind"].items()} == \
            {k: value(v) for k, v in refs[label]["by_kind"]["rgae"].items()}
    diff = m["comparison"]["metrics"]["pointing"]
    assert diff["difference"] == pytest.approx(value(refs["qformer"]["rgae"]) - value(refs["avgpool"]["rgae"]))
    assert "## qformer vs avgpool (paired)" in (report / "report.md").read_text()
