"""The committed wire code matches what proto/ generates."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_wire_code_matches_proto(tmp_path):
    gen = _load_gen()
    gen.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is generated from proto/ but not committed; run `make proto`"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} drifted from proto/; run `make proto`"
    committed_all = {p.relative_to(ROOT) for p in (ROOT / "fedcommon" / "wire").glob("*_pb2*.py")}
    assert committed_all == set(generated), "committed wire modules without a .proto source"
