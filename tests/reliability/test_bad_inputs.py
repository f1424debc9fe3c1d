"""Bad inputs through the real command line: one clear line, exit 2, nothing lost."""

import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from cellmi.data.readers import write_dib
from cellmi.store import open_store
from tests.clirun import CodePayload, assert_one_line_error

CHANNELS = ("DNA", "pH3", "actin")


def cellmi(*args, env=None, timeout=180):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CELLMI_", "AWS_"))}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "cellmi", *args], capture_output=True, text=True,
                          env=full, timeout=timeout)


def raw_folder(path, samples=3, size=48):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(1, samples + 1):
        pixels = rng.poisson(100, (3, size, size)).astype(np.uint16)
        pixels[:, 10:20, 10:25] += 2000
        for c, name in enumerate(CHANNELS):
            (path / f"{s:04d}1-{name}.DIB").write_bytes(write_dib(pixels[c]))
    return path


def tiff_bytes(array):
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def corrupt(name, data):
    return lambda raw: (raw / name).write_bytes(data)


DIB = write_dib(np.full((48, 48), 700, np.uint16))
CASES = {
    "truncated DIB": (corrupt("00011-DNA.DIB", DIB[:-500]), "00011-DNA.DIB: truncated DIB"),
    "corrupt DIB header": (corrupt("00011-DNA.DIB", DIB[:4] + struct.pack("<i", 0) + DIB[8:]),
                           "00011-DNA.DIB: corrupt DIB header"),
    "z-stack": (corrupt("00011-DNA.DIB", DIB[:12] + struct.pack("<H", 2) + DIB[14:]),
                "00011-DNA.DIB: DIB holds 2 planes"),
    "mismatched sizes": (corrupt("00021-pH3.DIB", write_dib(np.ones((40, 48), np.uint16))),
                         "sample 0002 field 1: channel sizes differ"),
    "missing channel": (lambda raw: (raw / "00031-actin.DIB").unlink(), "missing channel(s) ['actin']"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_raw_files_leave_the_old_store_alone(tmp_path, case):
    raw = raw_folder(tmp_path / "raw")
    work = tmp_path / "work"
    assert cellmi("ingest", "--source", str(raw), "--workdir", str(work),
                  "--ingest.n_test", "1").returncode == 0
    before = open_store(str(work / "store.zarr")).read_image("0001", "1")
    damage, message = CASES[case]
    damage(raw)
    proc = cellmi("ingest", "--source", str(raw), "--workdir", str(work), "--ingest.n_test", "1",
                  "--ingest.overwrite")
    assert_one_line_error(proc, message, "nothing written")
    store = open_store(str(work / "store.zarr"))  # still there, still complete
    np.testing.assert_array_equal(store.read_image("0001", "1"), before)


def test_corrupt_tiff_nan_and_duplicates(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    ok = np.full((16, 16), 300, np.uint16)
    for s in ("A", "B", "C"):
        for c in CHANNELS:
            (raw / f"{s}_1_{c}.tif").write_bytes(tiff_bytes(ok))
    (raw / "A_1_DNA.tif").write_bytes(b"II*\0not a tiff at all")
    nan = np.ones((16, 16), np.float32)
    nan[3, 3] = np.nan
    (raw / "B_1_pH3.tif").write_bytes(tiff_bytes(nan))
    (raw / "C_1_actin.png").write_bytes(tiff_bytes(ok))
    proc = cellmi("ingest", "--source", str(raw), "--workdir", str(tmp_path / "w"),
                  "--ingest.preset", "generic", "--ingest.n_test", "1")
    assert_one_line_error(proc, "3 problem(s)", "A_1_DNA.tif: unreadable TIFF", "B_1_pH3.tif: 1 NaN/Inf",
                          "duplicate files for sample C field 1 channel actin")
    assert not (tmp_path / "w").exists()


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cellmi("ingest", "--source", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, "source folder is empty")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CELLMI_TRAIN__EPOHCS": "3"}, "CELLMI_TRAIN__EPOHCS: unknown setting"),
        ({"CELLMI_INFER__MIN_FOREGROUND": "1.5"}, "CELLMI_INFER__MIN_FOREGROUND (--infer.min_foreground)"),
        ({"CELLMI_SYNTH__SAMPLES": "40"}, "CELLMI_SYNTH__SAMPLES (--synth.samples): Input should be less"),
    ],
)
def test_bad_settings(tmp_path, env, fragment):
    proc = cellmi("run", "--workdir", str(tmp_path / "w"), env=env)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "w").exists()


def test_unreachable_s3_endpoint_fails_fast(tmp_path):
    """Nothing listens there: an infrastructure fault (it may be restarting), retried with backoff, then 75."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "fake-id",
           "AWS_SECRET_ACCESS_KEY": "fake-secret-value", "CELLMI_TIMEOUTS__S3_ATTEMPTS": "2"}
    start = time.monotonic()
    proc = cellmi("ingest", "--source", "s3://bucket/raw", "--workdir", str(tmp_path / "w"), env=env, timeout=120)
    assert_one_line_error(proc, "waiting on s3://bucket/raw", 'Could not connect to the endpoint URL: "http://127.0.0.1:9',
                          "safe to retry (exit status 75)", code=75)
    assert "fake-secret-value" not in proc.stderr + proc.stdout
    assert time.monotonic() - start < 100  # bounded retries, not a hang


def test_unauthorised_s3(tmp_path):
    """A real moto server that checks credentials, in its own process."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000",
               "AWS_SECRET_ACCESS_KEY": "not-a-valid-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        proc = cellmi("ingest", "--source", "s3://bucket/raw", "--workdir", str(tmp_path / "w"), env=env)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
        assert "not-a-valid-secret" not in proc.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------- bad checkpoints given to `cellmi infer`
def infer_run(tmp_path):
    """A run folder with a small complete store and no checkpoint of its own."""
    from cellmi.store import join
    from tests.infer.standin import make_store

    workdir = str(tmp_path / "run")
    make_store(join(workdir, "store.zarr"), samples=2, fields=1, size=96)
    return workdir


def checkpoint_state(**changes):
    """A complete checkpoint dict of the tiny encoder, with ``changes``."""
    from cellmi.train.checkpoint import CHECKPOINT_KEYS, FORMAT
    from tests.infer.standin import CHANNELS, TINY, tiny_encoder

    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(format=FORMAT, arch=dict(TINY), encoder=tiny_encoder().state_dict(), step=7, stop_reason="steps",
                 settings={"model": {"crop": TINY["crop"]}}, channels=list(CHANNELS), train_seconds=0.0)
    state.update(changes)
    return state


def assert_nothing_computed(workdir):
    assert sorted(os.listdir(workdir)) == ["store.zarr"]  # no parts, no representations


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        ({"width": 16}, "checkpoint weights do not fit the encoder architecture"),
        ({"depth": 3}, "incompatible architecture"),
    ],
)
def test_a_checkpoint_of_another_architecture_is_refused_by_infer(tmp_path, arch, fragment):
    import torch

    from tests.infer.standin import TINY

    workdir = infer_run(tmp_path)
    url = str(tmp_path / "other" / "step_000007.pt")
    os.makedirs(os.path.dirname(url))
    torch.save(checkpoint_state(arch={**TINY, **arch}), url)  # the tiny weights under another description
    proc = cellmi("infer", "--workdir", workdir, "--infer.checkpoint", url, "--infer.workers", "1")
    assert_one_line_error(proc, f"cellmi infer: error: {url}: ", fragment)
    assert_nothing_computed(workdir)


def test_a_pickle_with_code_given_to_infer_is_refused_unrun(tmp_path):
    import pickle

    import torch

    workdir = infer_run(tmp_path)
    marker = tmp_path / "code-ran"
    url = str(tmp_path / "evil.pt")
    torch.save(checkpoint_state(settings=CodePayload(str(marker))), url)
    plain = str(tmp_path / "evil.pkl")  # a bare pickle of the code, and a file name not ending in .pt
    with open(plain, "wb") as handle:
        pickle.dump(CodePayload(str(marker)), handle)
    for path in (url, plain):
        proc = cellmi("infer", "--workdir", workdir, "--infer.checkpoint", path, "--infer.workers", "1")
        assert_one_line_error(proc, f"cellmi infer: error: {path}: refused to load", "(nothing in it was run)")
        assert not marker.exists(), f"loading {path} ran the code in it"
    assert_nothing_computed(workdir)
    torch.load(url, weights_only=False)  # the control: a full unpickler does run it
    assert marker.exists()
