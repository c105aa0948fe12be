import pytest

from elo_ray import storage


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_remove_round_trip(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/p"
    uri = storage.join(root, "a", "b.txt")
    storage.write_text(uri, "héllo")
    assert storage.read_text(uri) == "héllo"
    assert storage.exists(uri)
    assert storage.listdir(storage.join(root, "a")) == ["b.txt"]
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(uri)
    assert storage.listdir(storage.join(root, "a")) == []


def test_local_write_leaves_no_temp_file(tmp_path):
    uri = str(tmp_path / "m.json")
    storage.write_bytes(uri, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_missing_object_error_names_the_uri(tmp_path):
    with pytest.raises(storage.StorageError, match="nope.json does not exist"):
        storage.read_bytes(str(tmp_path / "nope.json"))


def test_upload_download_tree(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "y.txt").write_text("y")
    storage.upload(str(src), s3_bucket + "/tree")
    assert storage.listdir(s3_bucket + "/tree") == ["sub", "x.bin"]
    out = storage.download(s3_bucket + "/tree", str(tmp_path / "dst"), names=["x.bin"])
    assert (tmp_path / "dst" / "x.bin").read_bytes() == b"\x00\x01"
    assert out == str(tmp_path / "dst")
