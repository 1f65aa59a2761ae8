"""python/train.py end to end at tiny sizes: outputs, finite losses, resume after a kill, a
dense checkpoint as the start, a transformers model, and a 2-process torchrun (gloo) run."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "python", "train.py")
STAGES = ("pretrain", "warmup", "sparse", "dense_baseline")


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small corpus of the repository's own text (fast to load), two directories deep."""
    d = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(sorted(os.listdir(os.path.join(ROOT, "dsa_ext")))):
        if name.endswith(".py"):
            sub = d / f"part{i % 2}"
            sub.mkdir(exist_ok=True)
            with open(os.path.join(ROOT, "dsa_ext", name)) as f:
                (sub / (name + ".txt")).write_text(f.read())
    return str(d)


def run(out, *extra, launcher=(sys.executable,), check=True, timeout=300):
    cmd = [*launcher, TRAIN, "--preset", "tiny", "--out", str(out), *extra]
    res = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def check_results(r, world=1, stages=STAGES, seq_len=128, k=16):
    for key in ("seq_len", "k", "val_loss_dense", "val_loss_dsa", "recall_init", "recall_warmup",
                "recall_final", "val_loss_pretrained", "val_loss_dsa_after_warmup"):
        assert key in r, key
    assert r["seq_len"] == seq_len and r["k"] == k and r["world_size"] == world
    for key in ("val_loss_dense", "val_loss_dsa", "val_loss_pretrained", "val_loss_dsa_after_warmup"):
        assert math.isfinite(r[key]) and 0 < r[key] < 20, (key, r[key])
    for key in ("recall_init", "recall_warmup", "recall_final", "recall_oracle"):
        assert 0 < r[key] <= 1 + 1e-6, (key, r[key])
    assert r["recall_warmup"] <= r["recall_oracle"] + 1e-6
    assert set(r["tokens_per_s"]) == set(stages) and all(v > 0 for v in r["tokens_per_s"].values())
    for stage in stages:
        for entry in r["history"][stage]:
            assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float)), entry
    # the baseline and the DSA model saw the same number of tokens
    assert r["tokens"]["sparse"] == r["tokens"]["dense_baseline"] > 0


def test_default_data_run_writes_everything(tmp_path):
    run(tmp_path)
    r = results(tmp_path)
    check_results(r)
    assert "stdlib" in r["data"] and r["vocab_size"] == 256 and r["data_layout"] == {"packed": False}
    for name in ("results.md", "curves.png", "config.json"):
        assert os.path.getsize(tmp_path / name) > 0
    # the finished run's generation check (python/eval_generation.py): sparse decoding is dense
    # decoding while every key fits in the top-k
    cmd = [sys.executable, os.path.join(ROOT, "python", "eval_generation.py"), "--run", str(tmp_path),
           "--tokens", "24", "--prompts", "2", "--windows", "2"]
    res = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    g = json.loads((tmp_path / "generation.json").read_text())
    assert g["generation"]["within_topk_identical"] and g["generation"]["within_topk_tokens"] > 0
    assert all(math.isfinite(v) and v > 1 for v in g["perplexity"].values())
    for stage in STAGES:
        assert (tmp_path / "ckpt" / f"{stage}.pt").exists()
    table = (tmp_path / "results.md").read_text()
    assert "recall" in table and "DSA vs dense" in table
    for stage in STAGES:  # the progress table the run kept up to date, complete
        assert f"| {stage} | 3 / 3 | " in table and table.count("| done |") == len(STAGES), table


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """100 documents of 60 to 400 bytes (pieces of the repository's text): several per window."""
    with open(os.path.join(ROOT, "dsa_ext", "nn", "attention.py")) as f:
        text = f.read()
    d = tmp_path_factory.mktemp("short_docs")
    at = 0
    for i in range(100):
        n = 60 + (i * 37) % 340
        (d / f"doc{i:03d}.txt").write_text(text[at:at + n])
        at = (at + n) % (len(text) - 400)
    return str(d)


@pytest.mark.parametrize("arch", ["decoder", "llama"])
def test_pack_trains_on_packed_documents(tmp_path, short_docs, arch):
    """--pack: windows of packed files, attention inside each (the decoder and transformers models
    take the documents from position ids that restart); results.json says so."""
    if arch == "llama":
        pytest.importorskip("transformers")
    run(tmp_path, "--data", short_docs, "--arch", arch, "--pack")
    r = results(tmp_path)
    check_results(r)
    assert r["data_layout"]["packed"] and r["data_layout"]["documents_per_window"] > 1, r["data_layout"]
    assert r["config"]["pack"] is True and "packed documents" in (tmp_path / "results.md").read_text()


def test_packed_batch_trains_each_document_alone():
    """What --pack hands the model and the loss, in process: the logits of a packed window's
    documents are each document's alone, and a document's first token is no target."""
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import torch

    import train
    import train_data
    import train_parallel
    from dsa_ext import decoder

    torch.manual_seed(0)
    model = decoder.Decoder(decoder.DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2)).double()
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    batch = train_data.Batch(torch.randint(0, 32, (1, 13)), positions)
    logits = train.logits_of(model, batch, train_parallel.Env(0, 1, torch.device("cpu")))
    for a, b in ((0, 3), (3, 8), (8, 12)):
        torch.testing.assert_close(logits[:, a:b], model(batch.ids[:, a:b]), rtol=0, atol=1e-12)
    assert torch.equal(train.lm_targets(batch) == -100, positions[:, 1:] == 0)


def test_document_positions_restart_per_document_and_window():
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import numpy as np
    import train_data

    pos = train_data.document_positions(np.array([0, 5, 7, 20]), np.array([3, 0, 18]), 6)
    assert pos.tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3]]


def test_resume_after_kill_gives_the_uninterrupted_result(tmp_path, text_dir):
    args = ("--data", text_dir, "--pretrain-steps", "6", "--warmup-steps", "6", "--sparse-steps", "6")
    run(tmp_path / "whole", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, TRAIN, "--preset", "tiny", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt" / "warmup.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    progress = (out / "results.md").read_text()  # written as the run went: stage 1 done, a later one not
    # (warm-up is 6 tiny steps: the kill may land while it runs or just after it, before sparse ends)
    unfinished = "| running |" in progress or "| pending |" in progress
    assert "| pretrain | 6 / 6 | " in progress and "| warmup | " in progress and unfinished, progress
    run(out, *args, "--resume")
    a, b = results(tmp_path / "whole"), results(out)
    for key in ("val_loss_dense", "val_loss_dsa", "recall_init", "recall_warmup", "recall_final"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert a["history"]["sparse"][-1]["val_loss"] == pytest.approx(b["history"]["sparse"][-1]["val_loss"], rel=1e-5)


def test_start_from_a_dense_checkpoint(tmp_path, text_dir):
    run(tmp_path / "first", "--data", text_dir)
    init = tmp_path / "first" / "ckpt" / "pretrain.pt"
    run(tmp_path / "second", "--data", text_dir, "--init", str(init))
    r = results(tmp_path / "second")
    check_results(r, stages=STAGES[1:])
    assert "pretrain" not in r["history"]
    assert r["val_loss_pretrained"] == pytest.approx(results(tmp_path / "first")["val_loss_pretrained"], rel=1e-6)


def test_transformers_llama_run(tmp_path, text_dir):
    pytest.importorskip("transformers")
    run(tmp_path, "--data", text_dir, "--arch", "llama")
    check_results(results(tmp_path))
    assert (tmp_path / "dsa_model" / "dsa_indexer.safetensors").exists()
    assert (tmp_path / "dsa_model" / "config.json").exists()


@pytest.mark.parametrize("arch", ["deepseek_v32", "glm_moe_dsa"])
def test_transformers_dsa_model_run(tmp_path, text_dir, arch):
    """A tiny DeepSeek-V3.2 / GLM-5 built from a config: its own indexers are warmed up and saved
    in its own checkpoint (no separate indexer file)."""
    pytest.importorskip("transformers")
    run(tmp_path, "--data", text_dir, "--arch", arch)
    check_results(results(tmp_path))
    with open(tmp_path / "dsa_model" / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == arch and config["index_topk"] == 16
    assert not (tmp_path / "dsa_model" / "dsa_indexer.safetensors").exists()


def test_torchrun_two_processes_gloo(tmp_path, text_dir):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run(tmp_path, "--data", text_dir, "--batch-size", "4", launcher=launcher)
    check_results(results(tmp_path), world=2)


@pytest.mark.parametrize("extra", [(), ("--fsdp",), ("--pack",), ("--pack", "--arch", "deepseek_v32")],
                         ids=["ddp", "fsdp2", "packed", "packed_deepseek_v32"])
def test_torchrun_context_parallel_equals_one_process(tmp_path, request, extra):
    """--cp 2 on 2 processes (each sequence split over both; DDP, or FSDP2 of the model; packed
    short documents that the split cuts; DeepSeek-V3.2, whose dense stages run converted in mode
    dense under context parallelism) trains on the same batches as one process and reports the
    same results, up to float32 rounding."""
    data = request.getfixturevalue("short_docs" if "--pack" in extra else "text_dir")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run(tmp_path / "cp", "--data", data, "--cp", "2", *extra, launcher=launcher)
    run(tmp_path / "one", "--data", data, *[a for a in extra if a != "--fsdp"])
    a, b = results(tmp_path / "one"), results(tmp_path / "cp")
    check_results(b, world=2)
    assert b["context_parallel"] == 2 and b["data_parallel"] == 1 and b["fsdp"] == ("--fsdp" in extra)
    assert b["data_layout"] == a["data_layout"] and b["data_layout"]["packed"] == ("--pack" in extra)
    assert "--pack" not in extra or b["data_layout"]["documents_per_window"] > 1, b["data_layout"]
    for key in ("val_loss_pretrained", "val_loss_dsa_after_warmup", "val_loss_dense", "val_loss_dsa",
                "recall_init", "recall_warmup", "recall_final"):
        assert b[key] == pytest.approx(a[key], rel=1e-3), key


def test_bad_arguments_fail_clearly(tmp_path):
    res = run(tmp_path, "--data", str(tmp_path / "missing"), check=False)
    assert res.returncode != 0 and "no such file or directory" in res.stderr
    res = run(tmp_path, "--cp", "2", check=False)  # one process cannot hold half a sequence
    assert res.returncode != 0 and "--cp 2: expected a divisor of the number of processes (1" in res.stderr


class _Payload:
    """Unpickling this runs code: it creates the file it names (the attack a pickle can carry)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_payload_is_refused(tmp_path):
    """--init (and --resume) load with weights_only=True: a crafted file is refused, not executed."""
    import torch

    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, tmp_path / "evil.pt")
    res = run(tmp_path / "out", "--init", str(tmp_path / "evil.pt"), check=False)
    assert res.returncode != 0
    assert "refusing to load" in res.stderr and "could run arbitrary code" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()
