from conftest import Result, WorkspaceFixture


def test_push_then_diff_is_in_sync(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "hello")
    r: Result = tether("push", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("a.txt").read_text() == "hello"
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
