"""safe_shell: only read-only commands with whitelisted flags, inside the workspace, never keys, output capped."""

from __future__ import annotations

import os
import re

import pytest

from fedcommon.safe_shell import ShellRefused, run_shell


@pytest.fixture
def ws(tmp_path):
    """A workspace with a run folder, a log, a startup kit, and a secret next door."""
    root = tmp_path / "ws"
    (root / "run_1").mkdir(parents=True)
    (root / "run_1" / "log.txt").write_text("".join(f"line {i}\n" for i in range(1, 21)) + "ERROR boom\n")
    (root / "startup").mkdir()
    (root / "startup" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    (root / "startup" / "fed.json").write_text('{"name": "site-1"}\n')
    (root / "notes.key").write_text("secret\n")
    (tmp_path / "outside.txt").write_text("outside secret\n")
    return root


def test_ls_lists_the_workspace_including_startup_names(ws):
    result = run_shell(["ls", "-la"], ws)
    assert result.exit_code == 0
    assert "run_1" in result.stdout and "startup" in result.stdout
    assert "key.pem" in run_shell(["ls", "startup"], ws).stdout


def test_cat_head_tail_grep_and_pwd_work_inside_the_workspace(ws):
    assert run_shell(["cat", "run_1/log.txt"], ws).stdout.startswith("line 1\n")
    assert run_shell(["head", "-n", "2", "run_1/log.txt"], ws).stdout == "line 1\nline 2\n"
    assert run_shell(["tail", "-n1", "run_1/log.txt"], ws).stdout == "ERROR boom\n"
    assert run_shell(["grep", "-i", "error", "run_1/log.txt"], ws).stdout == "ERROR boom\n"
    assert run_shell(["grep", "-c", "line", "run_1/log.txt"], ws).stdout.strip() == "20"
    assert run_shell(["pwd"], ws).stdout.strip() == os.path.realpath(ws)


def test_a_missing_file_is_reported_with_the_commands_own_error(ws):
    result = run_shell(["cat", "nope.txt"], ws)
    assert result.exit_code != 0
    assert "nope.txt" in result.stdout


@pytest.mark.parametrize("command", ["rm", "sh", "python", "find", "cp"])
def test_commands_outside_the_whitelist_are_refused(ws, command):
    expected = f"shell: '{command}' is not allowed (allowed: cat, grep, head, ls, pwd, tail)"
    with pytest.raises(ShellRefused, match=re.escape(expected)):
        run_shell([command, "x"], ws)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["ls", "--color=always"], "--color=always"),
        (["ls", "-lX"], "-lX"),
        (["cat", "-n", "run_1/log.txt"], "-n"),
        (["tail", "-f", "run_1/log.txt"], "-f"),
        (["grep", "--include=*.txt", "x"], "--include=*.txt"),
        (["grep", "-f", "startup/key.pem", "run_1/log.txt"], "-f"),
    ],
)
def test_flags_outside_each_commands_whitelist_are_refused(ws, argv, flag):
    with pytest.raises(ShellRefused, match=re.escape(f"flag '{flag}' is not allowed for {argv[0]}")):
        run_shell(argv, ws)


def test_head_needs_a_number_of_lines(ws):
    with pytest.raises(ShellRefused, match="needs a number of lines, got 'x'"):
        run_shell(["head", "-n", "x", "run_1/log.txt"], ws)


def test_pwd_takes_no_arguments(ws):
    with pytest.raises(ShellRefused, match="pwd takes no arguments"):
        run_shell(["pwd", ".."], ws)


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["cat", "../outside.txt"], "../outside.txt"),
        (["ls", ".."], ".."),
        (["ls", "/etc"], "/etc"),
        (["grep", "-r", "secret", "run_1/../.."], "run_1/../.."),
        (["head", "-n", "1", "/etc/passwd"], "/etc/passwd"),
    ],
)
def test_paths_outside_the_workspace_are_refused(ws, argv, shown):
    with pytest.raises(ShellRefused, match=re.escape(f"shell: path '{shown}' is outside the workspace")):
        run_shell(argv, ws)


def test_a_symlink_that_escapes_the_workspace_is_refused(ws):
    (ws / "run_1" / "escape").symlink_to(ws.parent / "outside.txt")
    (ws / "run_1" / "up").symlink_to(ws.parent, target_is_directory=True)
    with pytest.raises(ShellRefused, match="path 'run_1/escape' is outside the workspace"):
        run_shell(["cat", "run_1/escape"], ws)
    with pytest.raises(ShellRefused, match="path 'run_1/up' is outside the workspace"):
        run_shell(["ls", "run_1/up"], ws)


@pytest.mark.parametrize(
    "argv",
    [
        ["cat", "startup/key.pem"],
        ["cat", "startup/fed.json"],
        ["head", "-n", "1", "notes.key"],
        ["tail", "run_1/../startup/key.pem"],
        ["grep", "secret", "startup/key.pem"],
        ["grep", "-r", "secret", "startup"],
    ],
)
def test_keys_certificates_and_startup_files_cannot_be_read(ws, argv):
    with pytest.raises(ShellRefused, match="is a key or certificate"):
        run_shell(argv, ws)


def test_a_symlink_to_a_key_cannot_be_read(ws):
    (ws / "run_1" / "innocent.txt").symlink_to(ws / "startup" / "key.pem")
    with pytest.raises(ShellRefused, match="'run_1/innocent.txt' is a key or certificate"):
        run_shell(["cat", "run_1/innocent.txt"], ws)


def test_recursive_grep_skips_keys_and_startup_folders(ws):
    result = run_shell(["grep", "-r", "secret"], ws)
    assert "secret" not in result.stdout
    assert result.exit_code == 1  # no match: nothing readable held the word


def test_a_pattern_that_looks_like_a_flag_is_searched_not_obeyed(ws):
    (ws / "run_1" / "flags.txt").write_text("--version\n")
    result = run_shell(["grep", "--", "--version", "run_1/flags.txt"], ws)
    assert result.stdout == "--version\n"


def test_output_is_capped_and_marked_truncated(ws):
    (ws / "big.txt").write_text("x" * 100_000)
    result = run_shell(["cat", "big.txt"], ws, max_output=1000)
    assert result.truncated
    assert len(result.stdout) == 1000
    assert not run_shell(["cat", "run_1/log.txt"], ws, max_output=1000).truncated


def test_a_command_that_runs_too_long_is_killed(ws):
    os.mkfifo(ws / "pipe")  # cat blocks opening a FIFO with no writer
    result = run_shell(["cat", "pipe"], ws, timeout=0.5)
    assert result.exit_code == 124
    assert "timed out after 0.5s and was killed" in result.stdout


def test_argv_must_be_a_list_of_strings(ws):
    with pytest.raises(ShellRefused, match="list of strings"):
        run_shell("ls -l", ws)  # type: ignore[arg-type]
    with pytest.raises(ShellRefused, match="list of strings"):
        run_shell([], ws)


@pytest.fixture(scope="module")
def private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _key_fragments(pem: str) -> list[str]:
    """Every 16-character piece of the key's body: none may appear in any output."""
    body = "".join(pem.strip().splitlines()[1:-1])
    return [body[i : i + 16] for i in range(0, len(body) - 15, 8)]


def _assert_no_key_material(output: str, pem: str) -> None:
    leaked = [piece for piece in _key_fragments(pem) if piece in output]
    assert not leaked, f"key material in the output: {leaked[:3]}"


@pytest.mark.parametrize(
    "argv",
    [
        ["cat", "notes.txt"],
        ["grep", "-r", "PRIVATE", "."],
        ["grep", "-rv", "nothing-matches-this", "."],
        ["grep", "-v", "--", "-----", "notes.txt"],
        ["head", "-n", "4", "notes.txt"],
        ["tail", "-n", "4", "notes.txt"],
        ["tail", "-n", "+4", "notes.txt"],
    ],
)
def test_a_private_key_copied_into_the_workspace_never_shows(ws, private_key_pem, argv):
    (ws / "notes.txt").write_text("before the key\n" + private_key_pem + "after the key\n")

    result = run_shell(argv, ws)

    _assert_no_key_material(result.stdout, private_key_pem)
    assert "[private key redacted]" in result.stdout


def test_grep_for_a_piece_of_the_key_body_shows_no_key_line(ws, private_key_pem):
    (ws / "notes.txt").write_text(private_key_pem)
    piece = private_key_pem.splitlines()[5][10:20]

    result = run_shell(["grep", "-rF", piece, "."], ws)

    _assert_no_key_material(result.stdout, private_key_pem)
    assert result.stdout == "[private key redacted]\n"


def test_a_key_cut_by_the_output_cap_is_redacted_from_its_begin_line(ws, private_key_pem):
    (ws / "notes.txt").write_text("before the key\n" + private_key_pem)

    result = run_shell(["cat", "notes.txt"], ws, max_output=len(private_key_pem) // 2)

    assert result.truncated
    assert result.stdout == "before the key\n[private key redacted]"


def test_text_around_a_key_and_ordinary_output_are_kept(ws, private_key_pem):
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    (ws / "notes.txt").write_text(f"before\n{private_key_pem}after\nsha256 {digest}\n{digest}\nok\n")

    result = run_shell(["cat", "notes.txt"], ws)

    assert result.stdout == f"before\n[private key redacted]\nafter\nsha256 {digest}\n{digest}\nok\n"


@pytest.mark.parametrize(
    "path", ["log.txt; touch PWNED", "a|b", "$(touch PWNED)", "`touch PWNED`", "a && b", "x > y", "a\nb"]
)
def test_a_path_holding_shell_syntax_is_refused_naming_it(ws, path):
    with pytest.raises(ShellRefused, match="holds shell syntax"):
        run_shell(["cat", path], ws)
    assert not (ws / "PWNED").exists()


def test_a_grep_pattern_may_hold_shell_syntax_and_is_searched_literally(ws):
    (ws / "notes.txt").write_text("a|b\n$HOME\n")
    result = run_shell(["grep", "-F", "a|b", "notes.txt"], ws)
    assert result.stdout == "a|b\n"
