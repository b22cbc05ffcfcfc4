"""``savepoint inspect|verify`` and the converters on ``s3://`` steps, against a real S3 server (moto's):
the same results as on a local folder, damage caught, store errors as one line."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from savepoint.checkpoint.object_folder import ObjectFolder, listing
from savepoint.checkpoint.objstore import ObjectPath, client
from tests.conftest import run_cli
from tests.s3server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_inspect_verify_and_the_converters_on_s3(train, tmp_path, s3_bucket, capsys, monkeypatch):  # noqa: F811
    url = f"s3://{s3_bucket}/run"
    train("--checkpoint.folder", url, "--checkpoint.keep_latest_k", "0", stop_after=10, dump=tmp_path / "job")
    folder = ObjectFolder(url)
    client().pipe_file((folder.step_dir(15) / "__0_0.distcp").path, b"partial")  # an interrupted save's leftover

    code, out, _ = run_cli(["inspect", url], capsys)
    assert code == 0, out
    assert re.search(rf"^{re.escape(url)}: 2 committed step\(s\)$", out, re.M), out
    assert re.search(r"^  step-5 +full +[\d.]+ MB +\d+ keys  saved by 1 process", out, re.M), out
    assert "leftovers from interrupted saves (no manifest.json; removed at next start): step-15" in out, out
    code, out, _ = run_cli(["inspect", f"{url}/step-10"], capsys)
    assert code == 0 and out.startswith(f"{url}/step-10: step 10, ") and "optimizer" in out, out

    code, out, _ = run_cli(["verify", url], capsys)
    assert code == 0, out
    assert [line.split(":")[1] for line in out.splitlines()] == [f"//{s3_bucket}/run/step-5",
                                                                  f"//{s3_bucket}/run/step-10"], out
    assert all(" OK, checksums match (" in line for line in out.splitlines()), out

    # Offline conversions from and to s3://, against the same conversions of a local copy.
    local_step = tmp_path / "local-step"
    client().get(folder.step_dir(10).path, str(local_step), recursive=True)
    assert run_cli(["convert", "to_hf", str(local_step), str(tmp_path / "hf-local")], capsys)[0] == 0
    code, out, err = run_cli(["convert", "to_hf", f"{url}/step-10", str(tmp_path / "hf-from-s3")], capsys)
    assert code == 0, err
    expected = _tensors(tmp_path / "hf-local")
    got = _tensors(tmp_path / "hf-from-s3")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    hf_url = f"s3://{s3_bucket}/hf"
    code, out, err = run_cli(["convert", "to_hf", f"{url}/step-10", hf_url], capsys)
    assert code == 0 and out.strip().endswith(f"wrote {hf_url}"), err
    assert {"config.json", "model.safetensors.index.json"} <= set(listing(ObjectPath(hf_url))) or \
        "model.safetensors" in listing(ObjectPath(hf_url))
    dcp_url = f"s3://{s3_bucket}/from-hf"
    code, out, err = run_cli(["convert", "from_hf", hf_url, dcp_url, "--model_flavor", "debugmodel"], capsys)
    assert code == 0, err
    assert {".metadata", "__0_0.distcp"} <= set(listing(ObjectPath(dcp_url)))
    code, out, err = run_cli(["convert", "from_hf", str(tmp_path / "hf-local"), str(tmp_path / "dcp-local"),
                              "--model_flavor", "debugmodel"], capsys)
    assert code == 0, err
    assert client().cat_file(f"{ObjectPath(dcp_url).path}/__0_0.distcp") == \
        (tmp_path / "dcp-local" / "__0_0.distcp").read_bytes()
    code, _, err = run_cli(["convert", "from_hf", hf_url, dcp_url, "--model_flavor", "debugmodel"], capsys)
    assert code == 1 and f"error: output {dcp_url} already holds objects; nothing was written" in err, err
    code, out, err = run_cli(["convert", "to_torchtune", f"{url}/step-10", str(tmp_path / "tt.pt"),
                              "--model_flavor", "debugmodel"], capsys)
    assert code == 0 and (tmp_path / "tt.pt").is_file(), err

    # Damage: one flipped byte in an object is named by verify, which exits 1.
    data = folder.step_dir(5) / "__0_0.distcp"
    raw = bytearray(client().cat_file(data.path))
    raw[len(raw) // 3] ^= 0x40
    client().pipe_file(data.path, bytes(raw))
    code, out, err = run_cli(["verify", url], capsys)
    assert code == 1, out
    assert re.search(rf"^{re.escape(str(data.parent))}: CORRUPT: {re.escape(str(data))} is corrupt: bytes \[\d+, \d+\) "
                     r"do not match their checksum$", out, re.M), out
    assert "error: 1 of 2 step(s) failed verification: step-5" in err, err

    # Store errors: one line each.
    code, _, err = run_cli(["verify", "s3://no-such-bucket/run"], capsys)
    assert code == 1 and err.count("\n") == 1 and "bucket no-such-bucket does not exist at" in err, err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SAVEPOINT_S3_ATTEMPTS", "1")
    for argv in (["inspect", url], ["convert", "to_hf", f"{url}/step-10", str(tmp_path / "never")]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and err.count("\n") == 1 and "cannot reach the object store at http://127.0.0.1:9" in err, err
    assert not (tmp_path / "never").exists()
