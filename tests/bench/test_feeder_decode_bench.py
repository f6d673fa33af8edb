"""The feeder and decode benches and the GPU summary: they run, keep every row, compare like with like, and import
on the device machine (torch, numpy, pyarrow, pillow, fsspec only)."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backfill import reader as reader_module
from backfill.images import decode
from backfill.preprocess import Preprocess
from backfill.sample import synthetic_image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import decode_bench  # noqa: E402
import embed_bench  # noqa: E402
import feeder_bench  # noqa: E402
import gpu_summary  # noqa: E402


def _jpeg(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_feeder_bench_reads_every_row_and_puts_the_reader_back(tmp_path, capsys):
    before = reader_module.make_fetcher, reader_module.Preprocessor, reader_module.bounded_map
    argv = ["--images", "40", "--unique", "3", "--side", "48", "--size", "32", "--batch", "8"]
    grid = "fetch=2,decode=1;fetch=3,decode=2,assemble=3"  # 3 assembly threads: still every row, in order
    assert feeder_bench.main([*argv, "--grid", grid, "--out", str(tmp_path)]) == 0
    assert (reader_module.make_fetcher, reader_module.Preprocessor, reader_module.bounded_map) == before
    rows = json.loads((tmp_path / "feeder_bench_cpu.json").read_text())
    assert list(rows) == ["fetch=2,decode=1", "fetch=3,decode=2,assemble=3"]
    for row in rows.values():
        assert row["images"] == 40 and row["rejects"] == 0
        assert row["cpu"]["decode"] > 0 and set(row["wall"]) == {"fetch", "decode", "assemble"}
    assert "fetch=3,decode=2,assemble=3" in capsys.readouterr().out


def test_a_mixed_corpus_has_a_size_nearly_per_image_and_the_feeder_reads_it(tmp_path):
    sizes = [embed_bench.mixed_size(i, 512) for i in range(256)]
    assert len(set(sizes)) > 200  # as in a real corpus: the GPU path resizes nearly every image on its own
    assert all(384 <= max(s) <= 768 and min(s) >= 384 * 9 // 16 for s in sizes), sizes  # 16:9 at the most
    assert {w > h for w, h in sizes} == {True, False}  # landscape and portrait
    argv = ["--images", "24", "--unique", "6", "--side", "48", "--size", "32", "--batch", "8", "--mixed"]
    assert feeder_bench.main([*argv, "--grid", "fetch=2,decode=1", "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "feeder_bench_cpu.json").read_text()).values()
    assert row["images"] == 24 and row["rejects"] == 0


@pytest.mark.parametrize("size", [(640, 480), (1003, 701), (100, 60), (4000, 300)])
def test_draft_scale_is_the_one_pil_picks(size):
    data = _jpeg(synthetic_image(np.random.default_rng(1)).resize(size))
    prep = Preprocess(64, "resize_crop")
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", prep.draft_size(*size))
    scale = decode_bench.draft_scale(*size, prep.draft_size(*size))
    assert img.size == (-(-size[0] // scale), -(-size[1] // scale))


def test_the_libjpeg_turbo_path_matches_pil_and_leaves_the_rest_to_it():
    simplejpeg = pytest.importorskip("simplejpeg")
    rng = np.random.default_rng(5)
    scene = synthetic_image(rng).resize((700, 500))
    good = _jpeg(scene, quality=90)
    clean = {
        "baseline": good,
        "progressive": _jpeg(scene, quality=90, progressive=True),
        "grayscale": _jpeg(scene.convert("L"), quality=90),
    }
    left_to_pil = {
        "cmyk": _jpeg(scene.convert("CMYK"), quality=90),
        "png": _jpeg(scene, "PNG"),
        "truncated": good[: len(good) // 3],
        "cut, EOI kept": good[: len(good) // 3] + b"\xff\xd9",
        "empty": b"",
    }

    def path(data: bytes, prep: Preprocess):
        return decode_bench.turbo_path(data, prep, simplejpeg.decode_jpeg_header, decode_bench._simplejpeg_scaled)

    for prep in decode_bench.contracts().values():
        for name, data in clean.items():
            got = path(data, prep)
            assert got is not None, name
            np.testing.assert_array_equal(got, decode(data, prep, 64_000_000), err_msg=name)
        for name, data in left_to_pil.items():
            assert path(data, prep) is None, name


def test_gpu_summary_judges_end_to_end_against_model_only(tmp_path):
    def report(model: str, a: float, d: float, **sweep: float) -> dict:
        rows = {gpu_summary.MODEL_ONLY: {"img_s": a}, gpu_summary.END_TO_END: {"img_s": d}}
        rows |= {f"{gpu_summary.SWEEP}{k}": {"img_s": v} for k, v in sweep.items()}
        return {"env": {"model": model, "precision": "bf16"}, "rows": rows}

    swept = {"decoder=nvimgcodec": 11300, "assemble=2": 10000}
    (tmp_path / "embed_bench_cuda_resnet50_bf16.json").write_text(json.dumps(report("resnet50", 14000, 9000, **swept)))
    (tmp_path / "embed_bench_cuda_resnet18_bf16.json").write_text(json.dumps(report("resnet18", 34000, 19000)))
    table = {what: (rate, ratio, verdict) for what, rate, ratio, _, verdict in gpu_summary.rows(str(tmp_path))}
    assert table["resnet50 bf16: embed_shard"] == ("9,000", "0.64", "MISSED")
    assert table["resnet50 bf16: decoder=nvimgcodec"] == ("11,300", "0.81", "met")  # 0.81x and over 11k
    assert table["resnet50 bf16: assemble=2"][2] == "MISSED"  # 0.71x
    assert table["resnet18 bf16: embed_shard"][2] == "MISSED"  # under 20k


def test_gpu_summary_reads_a_bench_stopped_by_its_timeout(tmp_path, monkeypatch):
    # embed_bench saves after every row it measures: a step cut off by gpu_check.sh's timeout in the middle of
    # its one round (the mixed-size and ResNet-18 steps run one) keeps the rows before, marked partial, and what
    # it never measured is not called missed
    argv = ["--images", "32", "--unique", "4", "--side", "48", "--batch", "8", "--skip", "naive,ray"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as timeout --signal=INT would, in round 1's end to end

    with monkeypatch.context() as patch:
        patch.setattr(embed_bench, "embed_shard", stopped)
        with pytest.raises(KeyboardInterrupt):
            embed_bench.main([*argv, "--model", "refcnn-v1", "--mixed", "--out", str(tmp_path)])
    name = "embed_bench_cpu_refcnn-v1_bf16_mixed.json"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no .tmp left
    report = json.loads((tmp_path / name).read_text())
    assert report["env"]["partial"] and report["env"]["mixed"]
    assert gpu_summary.MODEL_ONLY in report["rows"] and gpu_summary.END_TO_END not in report["rows"]
    report["env"]["model"] = "resnet50"  # judged as the headline model
    (tmp_path / name).write_text(json.dumps(report))
    table = {what: verdict for what, _, _, _, verdict in gpu_summary.rows(str(tmp_path))}
    assert table == {
        "resnet50 bf16 mixed sizes (partial): model-only": "",
        "resnet50 bf16 mixed sizes (partial): embed_shard": "not measured",
    }
    # and a finished run is not partial
    assert embed_bench.main([*argv, "--model", "refcnn-v1", "--out", str(tmp_path)]) == 0
    finished = json.loads((tmp_path / "embed_bench_cpu_refcnn-v1_bf16.json").read_text())
    assert finished["env"]["partial"] is False and (tmp_path / "embed_bench_cpu_refcnn-v1_bf16.txt").exists()


def test_gpu_summary_says_a_skipped_fallback_check_was_skipped_not_passed(tmp_path, capsys):
    def verdicts(*rcs: str) -> dict[str, str]:
        assert gpu_summary.main([str(tmp_path), *rcs]) == 0
        return {line.split("  ")[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}

    assert verdicts("skipped", "0") == {"nvjpeg fallback check": "SKIPPED", "nvimgcodec fallback check": "passed"}
    assert verdicts("1", "") == {"nvjpeg fallback check": "FAILED"}  # "": nvImageCodec's check did not run


def test_the_new_benches_import_with_only_the_device_packages():
    blocked = ("dagster", "faiss", "s3fs", "ray", "torchvision", "simplejpeg", "turbojpeg")
    probe = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not on the device machine: " + name)
sys.meta_path.insert(0, Refuse())
sys.path.insert(0, "bench")
import decode_bench, feeder_bench, gpu_summary
found = decode_bench.candidates()
assert found["simplejpeg"][0] is None and found["PyTurboJPEG"][0] is None, found
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
