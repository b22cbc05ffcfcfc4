"""Checkpoints in an ``s3://`` folder, against a real S3 server (moto's) on 127.0.0.1: the manifest-last
commit, resume, retention, corruption, kills, the Hugging Face export and import, the lease."""

from __future__ import annotations

import json
import time

import pytest
import torch

from savepoint.checkpoint.object_folder import ObjectFolder, listing
from savepoint.checkpoint.object_lease import ObjectLease
from savepoint.checkpoint.objstore import ObjectPath, client
from savepoint.errors import CheckpointError, CorruptCheckpointError, FatalCheckpointError
from tests.conftest import losses
from tests.s3server import S3Server, apply_env, s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from tests.test_resume import assert_bit_identical, optimizer_tensors


@pytest.fixture
def bucket(s3_bucket):  # noqa: F811
    return s3_bucket


def names(url: str) -> list[str]:
    """Every object under ``url``, relative to it."""
    root = ObjectPath(url).path
    return sorted(p[len(root) + 1:] for p in client().find(root))


def test_save_resume_is_bit_exact_and_the_manifest_is_the_commit_marker(train, tmp_path, bucket):
    url = f"s3://{bucket}/run"
    straight = train(dump=tmp_path / "straight")
    train("--checkpoint.folder", url, dump=tmp_path / "resumed", stop_after=10)
    folder = ObjectFolder(url)
    assert folder.committed_steps() == [5, 10]
    assert names(url) == [f"step-{s}/{n}" for s in (10, 5) for n in (".metadata", "__0_0.distcp", "manifest.json")]
    manifest = folder.read_manifest(10)
    assert manifest["files"] == {k: v for k, v in listing(folder.step_dir(10)).items() if k != "manifest.json"}
    assert not (tmp_path / "resumed" / "checkpoint").exists() and not (tmp_path / "resumed" / "s3:").exists()

    resumed = train("--checkpoint.folder", url, dump=tmp_path / "resumed")
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]
    assert_bit_identical(straight.model.state_dict(), resumed.model.state_dict())
    assert_bit_identical(optimizer_tensors(straight), optimizer_tensors(resumed))
    assert resumed.dataloader.sample_index == straight.dataloader.sample_index


def test_data_without_a_manifest_is_no_step_and_the_next_start_removes_it(train, tmp_path, bucket, monkeypatch):
    url = f"s3://{bucket}/run"
    train("--checkpoint.folder", url, stop_after=5)

    class Crash(BaseException):
        """Stands in for SIGKILL between the data and the manifest: no except clause runs."""

    def crash(self, step, manifest):
        raise Crash()

    with monkeypatch.context() as patched, pytest.raises(Crash):
        patched.setattr(ObjectFolder, "commit", crash)
        train("--checkpoint.folder", url, stop_after=10)
    assert "step-10/.metadata" in names(url) and ObjectFolder(url).committed_steps() == [5]
    # An upload a killed writer left unfinished is aborted at the next start too.
    bucket_name, key = ObjectPath(url).path.split("/", 1)
    client().call_s3("create_multipart_upload", Bucket=bucket_name, Key=f"{key}/step-10/__0_0.distcp")
    resumed = train("--checkpoint.folder", url, stop_after=5)
    assert resumed.train_state.step == 5
    assert [n for n in names(url) if n.startswith("step-10")] == []
    uploads = client().call_s3("list_multipart_uploads", Bucket=bucket_name, Prefix=key + "/").get("Uploads", [])
    assert not uploads


def test_load_step_and_retention(train, bucket):
    url = f"s3://{bucket}/run"
    train("--checkpoint.folder", url, "--checkpoint.keep_latest_k", "2", stop_after=15)
    folder = ObjectFolder(url)
    assert folder.committed_steps() == [10, 15]
    assert not [n for n in names(url) if n.startswith("step-5/")]  # deleted whole, manifest first
    again = train("--checkpoint.folder", url, "--checkpoint.load_step", "10", stop_after=10)
    assert again.train_state.step == 10
    with pytest.raises(CheckpointError, match=r"--checkpoint.load_step=7: no committed step-7 in s3://"):
        train("--checkpoint.folder", url, "--checkpoint.load_step", "7", stop_after=1)


def test_retention_deletes_the_manifest_first(bucket, monkeypatch):
    folder = ObjectFolder(f"s3://{bucket}/run")
    for step in (1, 2, 3):
        for name in (".metadata", "__0_0.distcp", "manifest.json"):
            client().pipe_file((folder.step_dir(step) / name).path, b"x")
    def dies_after_the_manifest(paths, *args, **kwargs):
        raise RuntimeError("killed while deleting")

    with monkeypatch.context() as patched, pytest.raises(OSError, match="killed while deleting"):
        patched.setattr(client(), "rm", dies_after_the_manifest)  # the data; the manifest goes by rm_file
        folder.retain_latest(2, just_saved=3)
    assert folder.committed_steps() == [2, 3]  # step-1 lost its manifest before any of its data went
    assert "step-1/.metadata" in names(str(folder.root))
    folder.clean_leftovers()
    assert not [n for n in names(str(folder.root)) if n.startswith("step-1/")]


def test_a_corrupted_object_is_caught_and_auto_resume_falls_back(train, tmp_path, bucket):
    url = f"s3://{bucket}/run"
    train("--checkpoint.folder", url, stop_after=10, dump=tmp_path / "a")
    data = ObjectPath(url) / "step-10" / "__0_0.distcp"
    raw = bytearray(client().cat_file(data.path))
    raw[len(raw) // 2] ^= 0x01
    client().pipe_file(data.path, bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"step-10/__0_0.distcp is corrupt: bytes \["):
        train("--checkpoint.folder", url, "--checkpoint.load_step", "10", stop_after=1, dump=tmp_path / "a")
    resumed = train("--checkpoint.folder", url, "--training.steps", "12", dump=tmp_path / "b")
    assert resumed.train_state.step == 12  # from step 5
    assert min(losses(tmp_path / "b")) == 6


@pytest.mark.parametrize("mode", ["async", "async_with_pinned_mem"])
def test_async_saves(train, tmp_path, bucket, mode):
    url = f"s3://{bucket}/{mode}"
    train(dump=tmp_path / "straight", stop_after=10)
    trainer = train("--checkpoint.folder", url, "--checkpoint.async_mode", mode, stop_after=10,
                    dump=tmp_path / "async")
    trainer.checkpointer.close()
    assert ObjectFolder(url).committed_steps() == [5, 10]
    resumed = train("--checkpoint.folder", url, stop_after=12, dump=tmp_path / "async")
    straight = train(dump=tmp_path / "straight", stop_after=12)
    assert_bit_identical(straight.model.state_dict(), resumed.model.state_dict())


def test_hf_export_and_import_on_s3(train, tmp_path, bucket):
    url = f"s3://{bucket}/run"
    trained = train("--checkpoint.folder", url, "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only",
                    "--model.hf_assets_path", "tests/assets/tokenizer", "--training.steps", "5",
                    "--checkpoint.interval", "100")
    folder = ObjectFolder(url)
    assert folder.committed_steps() == [5] and folder.is_hf(5)
    assert {"model.safetensors.index.json", "config.json", "manifest.json"} <= set(listing(folder.step_dir(5)))
    loaded = train("--checkpoint.initial_load_path", f"{url}/step-5", "--checkpoint.initial_load_in_hf",
                   "--checkpoint.folder", f"s3://{bucket}/fresh", "--training.steps", "1", stop_after=0,
                   dump=tmp_path / "fresh")
    for key, value in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value.to(torch.float32)), key


def test_missing_bucket_and_unreachable_endpoint(train, s3_env, monkeypatch):  # noqa: F811
    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket/run failed: bucket no-such-bucket does not exist "
                                               r"at http://127\.0\.0\.1:\d+: create it"):
        train("--checkpoint.folder", "s3://no-such-bucket/run", stop_after=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("SAVEPOINT_S3_ATTEMPTS", "2")  # botocore backs off 13 s over its default 4 attempts
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"cannot reach the object store at http://127\.0\.0\.1:9 .*check "
                                               r"AWS_ENDPOINT_URL"):
        train("--checkpoint.folder", "s3://some-bucket/run", stop_after=1)
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def checking_server():
    """A server that checks credentials and enforces bucket policies."""
    with S3Server(auth=True) as server:
        yield server


def test_wrong_credentials(train, checking_server, monkeypatch):
    apply_env(checking_server, monkeypatch)
    name = checking_server.make_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(CheckpointError, match=rf"s3://{name}/run failed: http://127\.0\.0\.1:\d+ refused the "
                                              r"credentials \(SignatureDoesNotMatch\): set AWS_ACCESS_KEY_ID and "
                                              r"AWS_SECRET_ACCESS_KEY"):
        train("--checkpoint.folder", f"s3://{name}/run", stop_after=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(CheckpointError, match=r"refused the credentials \(InvalidAccessKeyId\)"):
        train("--checkpoint.folder", f"s3://{name}/run", stop_after=1)


def test_a_put_refused_mid_save_costs_that_save_only(train, tmp_path, checking_server, monkeypatch, caplog):
    apply_env(checking_server, monkeypatch)
    name = checking_server.make_bucket()
    checking_server.deny_put(name, "run/step-10/__0_")  # the data of step 10; its mark and .metadata go through
    url = f"s3://{name}/run"
    trainer = train("--checkpoint.folder", url, "--training.steps", "15")
    assert trainer.train_state.step == 15  # the failed periodic save did not stop training
    assert ObjectFolder(url).committed_steps() == [5, 15]
    assert not [n for n in names(url) if n.startswith("step-10/")]  # nothing of it is left
    failed = [r.getMessage() for r in caplog.records if "saving step 10" in r.getMessage()]
    assert len(failed) == 1 and "failed: access denied by http://127.0.0.1" in failed[0], failed
    assert "nothing was committed and earlier steps are intact" in failed[0]
    assert not checking_server.uploads(name)


def test_the_server_going_away_mid_save(train, tmp_path, monkeypatch, caplog):
    with S3Server() as server:
        apply_env(server, monkeypatch)
        monkeypatch.setenv("SAVEPOINT_S3_ATTEMPTS", "2")
        name = server.make_bucket()
        url = f"s3://{name}/run"
        real = ObjectFolder.check_complete

        def server_dies(self, step, staging, views):
            if step == 10:
                server.stop()  # after every rank uploaded its data, before the manifest
            return real(self, step, staging, views)

        monkeypatch.setattr(ObjectFolder, "check_complete", server_dies)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"saving step 15 to {url}/step-15 failed .*cannot reach the "
                                                  r"object store at http://127\.0\.0\.1:\d+"):
            train("--checkpoint.folder", url, "--training.steps", "15")
        assert time.perf_counter() - start < 120
    failed = [r.getMessage() for r in caplog.records if "saving step 10" in r.getMessage()]
    assert len(failed) == 1 and "cannot reach the object store" in failed[0], failed
    assert max(losses(tmp_path / "run")) == 15  # training went on past the failed save


def test_the_lease(bucket, monkeypatch):
    root = ObjectPath(f"s3://{bucket}/run")
    first = ObjectLease(root)
    first.acquire()
    try:
        record = json.loads(client().cat_file((root / ".savepoint.lock").path))
        assert record["token"] == first.token and record["expires_unix"] > time.time()
        other = ObjectLease(root)
        other.holder = {**other.holder, "host": "elsewhere", "pid": 1}
        with pytest.raises(CheckpointError, match=r"is in use by another job \(pid \d+ on host .*expires in"):
            other.acquire()
        first.ensure_held()
    finally:
        first.release()
    assert ".savepoint.lock" not in listing(root)

    # A holder that stopped renewing (its lease expired), or a dead process on this host, loses the lease.
    stale = ObjectLease(root)
    stale.holder = {**stale.holder, "host": "elsewhere"}
    stale._write()
    client().pipe_file((root / ".savepoint.lock").path, json.dumps(
        {**json.loads(client().cat_file((root / ".savepoint.lock").path)), "expires_unix": time.time() - 1}).encode())
    taker = ObjectLease(root)
    taker.acquire()
    try:
        # The old holder, renewing now, finds another job's token: its next save stops the job.
        assert stale.renew() is False
        with pytest.raises(FatalCheckpointError, match=r"was taken by pid \d+ on host .*another job now writes"):
            stale.ensure_held()
        taker.ensure_held()
    finally:
        taker.release()
    # A worker group that the same torchrun agent restarted takes its predecessor's lease at once; the same
    # rendezvous id (run_train.sh's default is one name for every job) on another host does not.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "savepoint")
    before = ObjectLease(root)
    before.holder = {**before.holder, "pid": 1}  # alive (init), on this host, under this process's parent
    before._write()
    after = ObjectLease(root)
    after.acquire()
    after.release()
    elsewhere = ObjectLease(root)
    elsewhere.holder = {**elsewhere.holder, "host": "elsewhere", "pid": 1}
    elsewhere._write()
    with pytest.raises(CheckpointError, match="is in use by another job"):
        ObjectLease(root).acquire()
    # A damaged lease record is stale, not a traceback.
    client().pipe_file((root / ".savepoint.lock").path, b'{"token": "x", "expires_unix": "soon", "holder": {}}')
    last = ObjectLease(root)
    last.acquire()
    last.release()


def test_initial_load_from_s3_of_savepoint_and_of_torchtitan_steps(train, tmp_path, bucket, caplog):
    """A savepoint step (verified) and a plain DCP step written by torch's FsspecWriter, as TorchTitan's
    fsspec checkpoints are (no manifest: loaded unverified, with a warning), both start a new run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    source = train("--checkpoint.folder", f"s3://{bucket}/src", stop_after=5, dump=tmp_path / "src")
    model = {k: v.clone() for k, v in source.model.state_dict().items()}
    dcp.save(model, storage_writer=FsspecWriter(f"s3://{bucket}/titan/step-5", sync_files=False), no_dist=True)
    for path, verified in ((f"s3://{bucket}/src/step-5", True), (f"s3://{bucket}/titan/step-5", False)):
        caplog.clear()
        loaded = train("--checkpoint.initial_load_path", path, "--checkpoint.folder", f"s3://{bucket}/new-{verified}",
                       stop_after=0, dump=tmp_path / f"new-{verified}")
        assert_bit_identical(model, loaded.model.state_dict())
        warned = any("has no checksums" in r.getMessage() and "loading it unverified" in r.getMessage()
                     for r in caplog.records)
        assert warned is not verified
